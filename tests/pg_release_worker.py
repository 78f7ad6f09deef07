"""Run under torchrun by test_distributed.py: join and leave the process group through one of terdit's two
entry points, with torch._dynamo imported after joining (as diffusers and torch.compile do), and print
how many threads this process had before joining and after leaving."""

import os
import sys

import torch


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


if __name__ == "__main__":
    before = threads()
    if sys.argv[1] == "train":
        from terdit.distributed import broadcast_object, init_distributed, mean_across, shutdown

        info = init_distributed("cpu")
        import torch._dynamo  # noqa: F401

        mean_across(torch.ones(3), info)
        broadcast_object({"rank": info.rank}, info)
        shutdown(info)
    else:
        from terdit.data.latents import _Dist

        d = _Dist("cpu")
        import torch._dynamo  # noqa: F401

        d.agree(None)
        d.broadcast({"rank": d.rank})
        d.close()
    print(f"threads before {before} after {threads()}", flush=True)
