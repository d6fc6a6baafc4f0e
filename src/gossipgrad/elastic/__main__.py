"""Host the store of an elastic job on a machine that outlives its workers:

    python -m gossipgrad.elastic store --host 0.0.0.0 --port 29400

It runs a ``torch.distributed.TCPStore`` until stopped (Ctrl-C or SIGTERM); every worker opens
``TCPStore(HOST, 29400, is_master=False)`` and hands it to ``ElasticGossip``. For a job over
several machines, with torchrun restarting each rank on its own (each rank is its own replica
group, so one rank's death never restarts the others)::

    # on each machine, once per rank r of the job (N ranks in all); --standalone gives each
    # rank a rendezvous of its own, so its agent restarts that rank only:
    torchrun --standalone --nproc-per-node 1 --max-restarts 3 \\
        train.py --store STOREHOST:29400 --rank $r --world-size N

where ``train.py`` builds ``ElasticGossip(module, TCPStore(STOREHOST, 29400), world_size=N,
rank=r)`` (``GLOO_SOCKET_IFNAME`` naming the interface the machines reach each other on). A
restarted rank finds the job running and joins it from a live peer.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from datetime import timedelta

import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gossipgrad.elastic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="host the store of an elastic job")
    store.add_argument("--host", default="127.0.0.1", help="address to listen on")
    store.add_argument("--port", type=int, default=29400, help="port to listen on")
    args = parser.parse_args(argv)
    listener = socket.create_server((args.host, args.port))
    port = listener.getsockname()[1]
    server = dist.TCPStore(
        args.host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(minutes=30),
        master_listen_fd=listener.detach(),
    )
    print(f"gossipgrad elastic store listening on {args.host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
