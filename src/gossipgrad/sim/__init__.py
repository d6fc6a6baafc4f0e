"""The simulator: ``virtual`` runs p replicas in one process with the engine's own schedule and
mixing code (no torch.distributed); ``costmodel`` projects step times analytically. Neither
imports an engine, so simulations run anywhere torch does."""
