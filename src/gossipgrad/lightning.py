"""Gossip for PyTorch Lightning: ``GossipStrategy`` (``lightning.Trainer``) and
``GossipFabricStrategy`` (``lightning.Fabric``). Needs ``pip install 'gossipgrad[lightning]'``.

    trainer = lightning.Trainer(accelerator="gpu", devices=8, strategy=GossipStrategy())
    trainer.fit(model, datamodule)        # each replica gossips with one partner per step
    trainer.test(model, datamodule)       # the replicas were averaged when fit ended

    fabric = lightning.Fabric(accelerator="cpu", devices=4, strategy=GossipFabricStrategy())
    model, optimizer = fabric.setup(model, optimizer)   # model: GossipDataParallel inside
    fabric.save("last.ckpt", {"model": model, "optimizer": optimizer})  # the exact average

Both are Lightning's DDP strategies (same launchers, process groups, samplers, precision and
``torchrun`` / SLURM support) with ``GossipDataParallel`` in place of DDP; ``GossipOptions``
fields are keywords (``GossipStrategy(sync=True, wire_dtype=torch.bfloat16)``). What differs:

- Saving a checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``, ``fabric.save``) first
  averages the replicas exactly (one all-reduce, on every rank: these calls are collective
  already), so the file holds the one model that every rank then trains on; the optimizer state
  saved is rank 0's, as with DDP. Resuming (``fit(ckpt_path=...)``) starts every replica from
  that average; the partner schedule starts again at step 0.
- The end of ``fit`` averages the replicas, so ``trainer.test`` / ``validate`` / ``predict`` and
  the module in hand afterwards are that one model; the strategy's ``teardown`` then closes the
  ``GossipDataParallel`` (its hooks on torch and on the module are removed). With Fabric, call
  ``fabric.strategy.data_parallel(model).average_replicas()`` (or save) when training ends, and
  ``fabric.strategy.teardown()`` (on every rank) to remove the hooks.
- Validation during ``fit`` scores each rank's own replica on its share of the data (log with
  ``sync_dist=True`` to average the ranks' figures).
- Gradient accumulation (``accumulate_grad_batches``, ``fabric.no_backward_sync``): the
  accumulating backwards do not communicate, like DDP's ``no_sync``; the step, and its exchange
  with the partner, ends at the optimizer's step.
- Inside ``fit`` the ``DataParallel`` is ``trainer.strategy.model``: e.g. log
  ``consensus_distance()`` from ``on_train_batch_start``. It is a collective: call it on every
  rank, and not in an epoch-end hook, where rank 0's progress bar first syncs the epoch's
  ``sync_dist=True`` metrics while the other ranks would already be in it (a deadlock).

Use the ``lightning`` package (``import lightning``); ``pytorch_lightning`` has its own classes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

from torch import nn

from gossipgrad.gossip import GossipDataParallel
from gossipgrad.options import GossipOptions

try:
    from lightning.fabric.strategies import DDPStrategy as _FabricDDPStrategy
    from lightning.fabric.strategies.strategy import _BackwardSyncControl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as exc:  # pragma: no cover - exercised where Lightning is absent
    raise ImportError(
        "gossipgrad.lightning needs Lightning: pip install 'gossipgrad[lightning]' "
        "(or pip install lightning)"
    ) from exc

__all__ = ["GossipFabricStrategy", "GossipStrategy"]

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class GossipStrategy(DDPStrategy):
    """``lightning.Trainer`` strategy: ``DDPStrategy`` with ``GossipDataParallel`` (see the
    module docstring).

    Args:
        options: the gossip engine's options; keywords (``sync=True``, ...) override single
            fields. An unknown keyword raises a ``TypeError`` naming the options there are.
        start_method: how Lightning starts the processes: ``"popen"`` (re-runs the script,
            Lightning's default), ``"spawn"``, ``"fork"`` (notebooks, CPU) or ``"forkserver"``;
            under ``torchrun`` or SLURM nothing is started.
        process_group_backend: default ``"nccl"`` on GPUs, ``"gloo"`` on CPU.
    """

    def __init__(
        self,
        options: GossipOptions | None = None,
        *,
        start_method: StartMethod = "popen",
        process_group_backend: str | None = None,
        **overrides: Any,
    ) -> None:
        self.options = GossipOptions.build(options, **overrides)
        super().__init__(start_method=start_method, process_group_backend=process_group_backend)
        self._failure: BaseException | None = None  # what stopped fit, if anything did

    def configure_ddp(self) -> None:
        """Wrap the LightningModule (``fit`` only; the other stages run it as it is)."""
        assert self.model is not None
        self.model = GossipDataParallel(self.model, self.options)

    def block_backward_sync(self) -> AbstractContextManager[None]:  # type: ignore[override]
        """Gradient accumulation: the backwards inside do not communicate."""
        if isinstance(self.model, GossipDataParallel):
            return self.model.no_sync()
        return nullcontext()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The replicas' exact average (collective: Lightning calls it on every rank)."""
        if isinstance(self.model, GossipDataParallel):
            self._settle_logged_metrics()
            self.model.average_replicas()
        return super().lightning_module_state_dict()

    def _settle_logged_metrics(self) -> None:
        """Compute the metrics logged so far on this rank, before a collective of ours.

        Rank 0's progress bar computes them (with ``sync_dist=True``, a collective) at the start
        of epoch-end hooks, the other ranks only later: a collective of ours in between, as a
        ``trainer.save_checkpoint`` in ``on_train_epoch_end`` makes, would deadlock. On rank 0
        they are already computed and cached, so this is a no-op there.
        """
        assert self.lightning_module is not None
        _ = self.lightning_module.trainer.callback_metrics

    def on_train_end(self) -> None:
        """``fit`` exports one model: every replica becomes the exact average."""
        if isinstance(self.model, GossipDataParallel):
            self.model.average_replicas()
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        self._failure = exception
        super().on_exception(exception)

    def teardown(self) -> None:
        """Close the ``GossipDataParallel`` (every rank tears down: ``close`` is collective) and
        unwrap, as ``DDPStrategy`` does for DDP; after an error, leave without waiting for the
        partners, which may be gone."""
        if isinstance(self.model, GossipDataParallel):
            _close(self.model, self._failure)
            self.model = self.lightning_module
        self._failure = None
        super().teardown()


class GossipFabricStrategy(_FabricDDPStrategy):
    """``lightning.Fabric`` strategy: Fabric's ``DDPStrategy`` with ``GossipDataParallel``.
    Arguments as for ``GossipStrategy``."""

    def __init__(
        self,
        options: GossipOptions | None = None,
        *,
        start_method: StartMethod = "popen",
        process_group_backend: str | None = None,
        **overrides: Any,
    ) -> None:
        self.options = GossipOptions.build(options, **overrides)
        super().__init__(start_method=start_method, process_group_backend=process_group_backend)
        self._backward_sync_control = _GossipNoSync()
        self._wrapped: list[GossipDataParallel] = []

    def setup_module(self, module: nn.Module) -> GossipDataParallel:  # type: ignore[override]
        wrapped = GossipDataParallel(module, self.options)
        self._wrapped.append(wrapped)
        return wrapped

    def data_parallel(self, module: nn.Module) -> GossipDataParallel:
        """The ``GossipDataParallel`` around ``module`` (what ``fabric.setup`` returned, or the
        module given to it): for ``average_replicas()``, ``consensus_distance()``, ..."""
        original = getattr(module, "module", module)
        for wrapped in self._wrapped:
            if module is wrapped or wrapped.module is original or wrapped.module is module:
                return wrapped
        raise ValueError(
            f"this {type(module).__name__} was not set up with this strategy: pass the module "
            "that fabric.setup(...) returned"
        )

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The replicas' exact average (collective: ``fabric.save`` runs on every rank)."""
        if isinstance(module, GossipDataParallel):
            module.average_replicas()
            module = module.module
        return super().get_module_state_dict(module)

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        if isinstance(module, GossipDataParallel):
            # the exchange sent at the last optimizer step must not be mixed into what is loaded
            module.flush()
            module = module.module
        super().load_module_state_dict(module, state_dict, strict=strict)

    def teardown(self) -> None:
        """Close every ``GossipDataParallel`` this strategy set up (collective: call it on every
        rank; it completes the exchange in flight and removes the hooks), then Fabric's DDP
        teardown."""
        for wrapped in self._wrapped:
            wrapped.close()
        self._wrapped.clear()
        super().teardown()


class _GossipNoSync(_BackwardSyncControl):
    """``fabric.no_backward_sync(model)``: the backwards inside do not communicate."""

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager[None]:
        if not enabled:
            return nullcontext()
        if not isinstance(module, GossipDataParallel):
            raise TypeError(
                "fabric.no_backward_sync needs the module that fabric.setup(...) returned with "
                f"GossipFabricStrategy; got a {type(module).__name__}"
            )
        return module.no_sync()


def _close(model: GossipDataParallel, failure: BaseException | None) -> None:
    """``model.close()``; after ``failure``, leave as ``with model:`` does on an error (the hooks
    are removed without waiting for the partners)."""
    if failure is None:
        model.close()
    else:
        model.__exit__(type(failure), failure, failure.__traceback__)
