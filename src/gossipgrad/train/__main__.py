"""``python -m gossipgrad.train [options]``: one worker of the training job, e.g. under torchrun::

torchrun --nproc-per-node 4 -m gossipgrad.train --algo gossip --out runs/demo

The options are parsed before torch is imported, so ``--help`` and a bad option answer at once.
"""

import sys

from gossipgrad.train.config import load_config

config = load_config(sys.argv[1:], prog="python -m gossipgrad.train")

from gossipgrad.train.worker import worker  # noqa: E402 - imports torch: only for good options

worker(config)
