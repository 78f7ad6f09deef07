"""Session set-up that must happen before any test module imports terdit.

diffusers (imported by terdit.models) imports torch._dynamo, which imports triton when it is installed; the
kernel tests need triton in interpreter mode on machines without CUDA, so the switch is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
