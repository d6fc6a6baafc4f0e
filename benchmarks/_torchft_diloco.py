"""torchft's DiLoCo on the hosts of an emulated cluster: the peer that benchmarks/lm.py and
benchmarks/peers.py run (torchft's own code, not a re-implementation).

    d = TorchftDiLoCo([module], inner_optimizer, sync_every=8, outer=(0.7, 0.9), index=0,
                      name="diloco-h8", timeout=timedelta(seconds=300))   # collective
    ... inner_optimizer.step() ...            # DiLoCo's hooks sync every H steps
    d.finish(); state = d.state_dict(); d.close()                          # collective
    d = TorchftDiLoCo(...); d.load_state_dict(state)                       # the next round

Every host is a replica group of one process, with its own ``TCPStore`` and ``Manager``; the
``Lighthouse`` runs in host 0's process, on port ``LIGHTHOUSE_PORT + index`` (``index``: the
contender's, so that two never share one); each store takes a free port.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

LIGHTHOUSE_PORT = 29650


class TorchftDiLoCo:
    """torchft's ``DiLoCo`` (streaming with several ``parts``) hooked on ``inner``'s steps:
    every ``sync_every`` steps the pseudo-gradient (global minus local weights) of a part is
    all-reduced and an outer SGD step with Nesterov momentum (``outer``: lr, momentum) moves
    that part's global weights; ``delay``: inner steps the all-reduce overlaps, after which the
    part is ``lerp(global, local, alpha)``."""

    def __init__(
        self,
        parts: list[Any],
        inner: Any,
        *,
        sync_every: int,
        outer: tuple[float, float],
        index: int,
        name: str,
        timeout: timedelta,
        delay: int = 0,
        alpha: float = 0.0,
    ) -> None:
        import torch
        import torch.distributed as dist
        from torchft import Manager, ProcessGroupGloo
        from torchft._torchft import LighthouseServer
        from torchft.local_sgd import DiLoCo

        rank, world = dist.get_rank(), dist.get_world_size()
        addr = os.environ.get("NC_ADDR", "127.0.0.1")  # set on every host by netcluster.sh
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = LIGHTHOUSE_PORT + index
        self._lighthouse: Any = None
        if rank == 0:
            self._lighthouse = LighthouseServer(bind=f"[::]:{port}", min_replicas=world)
        self._store: Any = dist.TCPStore(addr, 0, 1, True, wait_for_workers=False)  # a free port
        dist.barrier()  # the lighthouse is up
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=world,
            use_async_quorum=False,  # DiLoCo needs it
            timeout=timeout,
            quorum_timeout=timeout,
            rank=0,
            world_size=1,
            store_addr=addr,
            store_port=self._store.port,
            lighthouse_addr=f"http://{master}:{port}",
            replica_id=f"{name}_{rank}",
            hostname=addr,
            init_sync=False,  # every replica starts from the same seed
        )
        lr, momentum = outer
        outers = [  # one per part: a shared one would step the others with inner gradients
            torch.optim.SGD(p.parameters(), lr=lr, momentum=momentum, nesterov=True) for p in parts
        ]
        self.diloco = DiLoCo(
            self.manager,
            parts,
            inner,
            outers,
            sync_every=sync_every,
            fragment_sync_delay=delay,
            fragment_update_alpha=alpha,
            use_bucketization=True,  # one flat all-reduce per part, not one per tensor
        )
        self.diloco.__enter__()
        self._window = (sync_every // len(parts) - delay, sync_every // len(parts))

    def finish(self) -> None:
        """Complete an overlapped all-reduce in flight (before evaluating)."""
        for fragment in self.diloco._fragments:
            for work in fragment._allreduce_work:
                work.wait()  # waits once; DiLoCo's own wait later returns at once

    def state_dict(self) -> dict[str, Any]:
        """What a rebuilt one needs to go on exactly: torchft's own checkpoint of the manager
        (each part's global weights and outer optimizer, the manager's step, as it sends to a
        recovering replica) and the inner steps since the last sync."""
        step = self.diloco._local_step
        if self._window[0] <= step < self._window[1]:
            raise RuntimeError(
                f"a part's all-reduce is in flight (inner step {step} of {self._window[1]}): "
                "save at another step, or without an overlap"
            )
        return {"manager": self.manager._manager_state_dict(), "local_step": step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state_dict()``'s ``state``, as torchft's recovery does
        (``Manager._apply_pending_state_dict``), and at the same inner step."""
        for key, value in state["manager"]["user"].items():
            self.manager._load_state_dict_fns[key](value)
        self.manager.load_state_dict(state["manager"]["torchft"])
        self.diloco._local_step = state["local_step"]

    def close(self) -> None:
        """Remove DiLoCo's hooks and stop torchft's servers (collective)."""
        import torch.distributed as dist

        self.diloco.__exit__(None, None, None)
        self.manager.shutdown()
        dist.barrier()  # every manager is down before the lighthouse goes
        if self._lighthouse is not None:
            self._lighthouse.shutdown()
        self._lighthouse = self._store = None  # the store's port is free for the next one
