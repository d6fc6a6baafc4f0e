import os
import sys

# Optimizers import torch._dynamo the first time one is built (seconds of CPU). Importing it once
# here means every forked test rank inherits it instead of paying for it again.
import torch._dynamo  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))
