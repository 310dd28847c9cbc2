"""Worker for test_distributed: ``[torchrun ...] _ddp_fit.py CONFIG OUT`` trains the first task once, on
deterministic (eval-transformed) images, and rank 0 saves the learner's trainable state to OUT."""
import json
import sys

import torch

from pilot.configure import build_config
from pilot.distributed import is_main
from pilot.engine import Run

config_path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
run = Run(build_config(json.loads(open(config_path).read())))
run.learner.train_transform = lambda: run.ctx.eval_transform  # the same pixels in both runs
run.learner.fit(run.stream.tasks[0])
if is_main():
    torch.save({name: value for name, value in run.learner.net.state_dict().items()}, out)
