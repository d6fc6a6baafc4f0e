"""``python -m gossipgrad.train [options]``: one worker of the training job, e.g. under torchrun::

torchrun --nproc-per-node 4 -m gossipgrad.train --algo gossip --out runs/demo
"""

from gossipgrad.train.worker import main

main()
