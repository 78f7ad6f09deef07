"""A short end-to-end check of an installed terdit (the lowest-versions environment runs it).

Trains the tiny digits model for a few steps, reopens the run through from_pretrained in bf16, saves and reloads a
diffusers folder, samples with TerDiTPipeline and with diffusers' own DiTPipeline (random tiny VAE), and exports and
loads a packed model. Prints the versions it ran with; exits non-zero on any failure.
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline

import terdit
from terdit import TerDiT, get_config
from terdit.deploy import export_model
from terdit.sampling.pipeline import TerDiTPipeline, diffusers_scheduler
from terdit.training.trainer import TrainArgs, Trainer

PACKAGES = ["torch", "numpy", "scipy", "scikit-learn", "safetensors", "huggingface_hub", "diffusers", "tqdm",
            "pillow"]


def main() -> int:
    print("terdit", terdit.__version__, "python", sys.version.split()[0])
    print(" ".join(f"{p}=={version(p)}" for p in PACKAGES))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        Trainer(TrainArgs(out=str(out / "run"), config="TerDiT-Digits", steps=4, batch_size=8, sample_steps=2,
                          progress=False, tensorboard=False)).run()
        model = TerDiT.from_pretrained(out / "run", torch_dtype=torch.bfloat16)
        assert model.dtype == torch.bfloat16, model.dtype
        assert TerDiT.from_pretrained(out / "run", dtype="bf16").dtype == torch.bfloat16  # terdit's spelling
        model.float().save_pretrained(out / "pretrained", variant="fp32")
        again = TerDiT.from_pretrained(out / "pretrained", variant="fp32")
        again.enable_gradient_checkpointing()
        assert again.grad_checkpointing
        pipe = TerDiTPipeline(again, scheduler=diffusers_scheduler("DDPMScheduler"))
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 9], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
        assert len(images) == 2 and images[0].size == (8, 8)
        pipe.save_pretrained(out / "pipeline")
        reopened = DiffusionPipeline.from_pretrained(out / "pipeline", low_cpu_mem_usage=False)
        assert type(reopened) is TerDiTPipeline and type(reopened.scheduler).__name__ == "DDPMScheduler"

        torch.manual_seed(0)
        imagenet = TerDiT(get_config("TerDiT-Micro", num_classes=1000)).eval()
        export_model(imagenet, out / "deploy", "base3")
        packed = TerDiT.from_pretrained(out / "deploy")
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
        dit = DiTPipeline(transformer=packed, vae=vae,
                          scheduler=DDIMScheduler.from_config(diffusers_scheduler("DDIMScheduler").config))
        dit.set_progress_bar_config(disable=True)
        arr = dit([207], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert arr.shape == (1, 16, 16, 3), arr.shape
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
