"""Run under torchrun by test_train.py: train, then dump this rank's weights for comparison."""

import json
import sys

import torch.distributed as dist  # noqa: F401  (torchrun sets the environment)

from terdit.io import save_tensors
from terdit.training.trainer import TrainArgs, Trainer

if __name__ == "__main__":
    args = TrainArgs(**json.loads(sys.argv[1]))
    trainer = Trainer(args)
    trainer.run()
    if args.parallel == "fsdp":  # sharded: the gathered checkpoint is what the test compares
        sys.exit(0)
    import os

    rank = int(os.environ["RANK"])
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    save_tensors(f"{args.out}/rank{rank}.safetensors", state)
