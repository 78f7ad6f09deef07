"""terdit distill: data-free distillation of a random tiny teacher into a ternary student."""

import json

import pytest
import torch
from random_models import random_micro, tiny_dit

from terdit.cli import main
from terdit.deploy.foreign import export_foreign, load_foreign
from terdit.diffusion import GaussianDiffusion
from terdit.io import load_tensors
from terdit.training.distill import (
    DistillArgs,
    TeacherPool,
    distill,
    distill_losses,
    load_student,
    load_teacher,
    make_student,
    model_output,
)
from terdit.training.trainer import TrainArgs

SMALL = dict(batch_size=8, log_every=1, progress=False, tensorboard=False, sample_steps=4)
POOL = dict(pool_size=16, pool_steps=3, pool_reuse=1)


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "dit"
    tiny_dit(classes=1000).save_pretrained(path)  # 1000 classes: DiTPipeline's null class is 1000
    return path


def _fixed_batch_loss(student, teacher, spec):
    """Student-teacher loss on a fixed batch of the teacher's own samples, all timesteps, fixed noise."""
    x0, y = TeacherPool(teacher, spec, 64, 1, 3, [1.0, 4.0], seed=99, device=torch.device("cpu")).draw(0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 999, len(x0)).long()
    with torch.no_grad():
        return float(distill_losses(student, teacher, GaussianDiffusion.create(None), x0, t, noise, y, 1000,
                                    0.0)["loss"].mean())


def test_distill_lowers_student_teacher_loss_and_packs_exactly(dit_teacher, tmp_path):
    run = tmp_path / "run"
    distill(TrainArgs(out=str(run), steps=25, lr=1e-4, **SMALL),
            DistillArgs(teacher=str(dit_teacher), **POOL))
    teacher, spec = load_teacher(str(dit_teacher))
    start = _fixed_batch_loss(make_student(teacher, spec).eval(), teacher, spec)
    student = load_student(run, ema=False)
    end = _fixed_batch_loss(student, teacher, spec)
    assert end < 0.8 * start, (start, end)  # measured: 0.65x at 25 steps
    assert json.loads((run / "distill.json").read_text())["teacher"] == str(dit_teacher.resolve())

    # packed export -> reload into DiTTransformer2DModel reproduces the ternary forward
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 999, 1000])
    with torch.no_grad():
        want = model_output(student, x, t, y)
    for fmt in ("2bit", "base3"):
        packed = load_foreign(export_foreign(student, tmp_path / fmt, fmt))
        assert type(packed).__name__ == "DiTTransformer2DModel"
        with torch.no_grad():
            got = model_output(packed, x, t, y)
        assert (got - want).abs().max() <= 1e-5

    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    pipe = DiTPipeline(transformer=packed, vae=vae, scheduler=DDIMScheduler())
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3)


def test_distill_resume_is_exact(dit_teacher, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    distill(TrainArgs(out=str(whole), steps=6, **SMALL), DistillArgs(teacher=str(dit_teacher), **POOL))
    distill(TrainArgs(out=str(part), steps=3, **SMALL), DistillArgs(teacher=str(dit_teacher), **POOL))
    distill(TrainArgs(out=str(part), steps=6, resume=True, **SMALL), DistillArgs(teacher="ignored on resume"))
    logs = [[json.loads(ln)["loss"] for ln in (r / "log.jsonl").read_text().splitlines()] for r in (whole, part)]
    assert len(logs[0]) == 6 and logs[0] == logs[1]
    a = load_tensors(whole / "checkpoints" / "0000006" / "model.safetensors")
    b = load_tensors(part / "checkpoints" / "0000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_terdit_teacher_gives_an_ordinary_run(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    random_micro(ternary=False).save_pretrained(teacher)
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--out", str(run), "--steps", "3", "--batch-size", "8",
                 "--pool-size", "16", "--pool-steps", "2", "--no-progress", "--no-tensorboard"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["linear"] == "ternary" and config["adaln_norm"] is False
    assert main(["info", str(run)]) == 0
    assert main(["sample", "--run", str(run), "--steps", "3", "--classes", "0", "1",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "deploy"), "--format", "base3"]) == 0
    from terdit.models import TerDiT

    student = load_student(run)
    deployed = TerDiT.from_pretrained(tmp_path / "deploy")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        assert (model_output(student, x, t, y) - model_output(deployed, x, t, y)).abs().max() <= 1e-5


def test_bad_teacher_is_one_line_exit_2(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["distill", "--teacher", "x", "--out", str(tmp_path / "r"), "--pool-steps", "0"]) == 2


def test_data_flag_uses_real_inputs_and_checks_their_shape(tmp_path, capsys):
    micro = tmp_path / "micro"
    random_micro(ternary=False).save_pretrained(micro)  # 4x8x8 latents: the digits (1x8x8) do not fit
    assert main(["distill", "--teacher", str(micro), "--out", str(tmp_path / "bad"), "--data", "digits"]) == 2
    assert "1x8x8" in capsys.readouterr().err
    digits = tmp_path / "digits"
    random_micro(ternary=False, in_channels=1).save_pretrained(digits)
    run = tmp_path / "run"
    distill(TrainArgs(out=str(run), steps=2, data="digits", **SMALL), DistillArgs(teacher=str(digits)))
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def test_model_output_accepts_tensors_tuples_and_sample_objects():
    from types import SimpleNamespace

    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([1, 2]), torch.tensor([0, 1])
    assert model_output(lambda *a: x, x, t, y) is x
    assert model_output(lambda *a: (x,), x, t, y) is x
    assert model_output(lambda *a: SimpleNamespace(sample=x), x, t, y) is x
    with pytest.raises(Exception, match="not a tensor"):
        model_output(lambda *a: "nope", x, t, y)


def test_load_foreign_rejects_other_directories(tmp_path):
    from terdit.errors import TerditError

    with pytest.raises(TerditError, match="not a packed diffusers directory"):
        load_foreign(tmp_path)
