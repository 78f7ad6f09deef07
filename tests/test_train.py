"""Training: exact resume, two-process DDP on CPU, run-folder safety."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from terdit.errors import TerditError
from terdit.io import load_tensors
from terdit.training.trainer import StepBatchSampler, TrainArgs, Trainer, make_optimizer

FAST = dict(config="TerDiT-Micro", batch_size=16, log_every=1, sample_steps=4, tensorboard=False, progress=False)


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def test_batch_sampler_covers_each_epoch_once_and_splits_ranks():
    s0 = StepBatchSampler(10, 3, seed=0, rank=0, world=2)
    s1 = StepBatchSampler(10, 3, seed=0, rank=1, world=2)
    stream = []
    for m in range(5):  # 5 micro-batches x 2 ranks x 3 = 30 positions = 3 epochs
        stream += s0.batch(m) + s1.batch(m)
    for epoch in range(3):
        chunk = stream[epoch * 10 : (epoch + 1) * 10]
        assert sorted(v % 10 for v in chunk) == list(range(10))
        assert all(v // 10 == epoch for v in chunk)
    assert StepBatchSampler(10, 3, 0, 0, 2, start=4).batch(4) == s0.batch(4)


def test_resume_gives_the_same_losses_and_weights(tmp_path):
    full = tmp_path / "full"
    Trainer(TrainArgs(out=str(full), steps=6, ckpt_every=3, **FAST)).run()
    part = tmp_path / "part"
    Trainer(TrainArgs(out=str(part), steps=3, **FAST)).run()
    Trainer(TrainArgs(out=str(part), steps=6, resume=True, **FAST)).run()
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
    wa = load_tensors(full / "checkpoints" / "0000006" / "model.safetensors")
    wb = load_tensors(part / "checkpoints" / "0000006" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (part / "samples.png").is_file()


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "r"
    Trainer(TrainArgs(out=str(run), steps=1, **FAST)).run()
    before = (run / "checkpoints" / "0000001" / "model.safetensors").read_bytes()
    with pytest.raises(TerditError, match="already holds a run"):
        Trainer(TrainArgs(out=str(run), steps=2, **FAST))
    assert (run / "checkpoints" / "0000001" / "model.safetensors").read_bytes() == before


def test_lr_drop_and_grad_accumulation(tmp_path):
    run = tmp_path / "r"
    Trainer(TrainArgs(out=str(run), steps=3, lr_drop_step=2, grad_accum=2, **FAST)).run()
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert lrs == [5e-4, 5e-4, 1e-4]


def _torchrun(tmp_path: Path, args: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("ddp_worker.py")), json.dumps(args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def test_trainer_optimizer_is_fused_on_cpu_and_steps_as_plain_adamw():
    from terdit.models import TerDiT, get_config

    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    twin = TerDiT(get_config("TerDiT-Micro"))
    twin.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    fused = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), start):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
        assert (p - p0).abs().max() > 1e-4, name  # 3 steps of lr 1e-3 moved it 100x the tolerance


def test_two_process_ddp_and_fsdp_on_cpu(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    res = _torchrun(tmp_path, dict(FAST, out=str(ddp), steps=3, parallel="ddp", device="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = load_tensors(ddp / "rank0.safetensors"), load_tensors(ddp / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = load_tensors(ddp / "checkpoints" / "0000003" / "model.safetensors")
    assert all(torch.equal(saved[k], r0[k]) for k in saved)
    assert len(_losses(ddp)) == 3
    # FSDP shards the same computation: the gathered weights must agree with DDP's
    res = _torchrun(tmp_path, dict(FAST, out=str(fsdp), steps=3, parallel="fsdp", device="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    sharded = load_tensors(fsdp / "checkpoints" / "0000003" / "model.safetensors")
    assert sharded.keys() == saved.keys()
    for k in saved:
        assert torch.allclose(sharded[k], saved[k], atol=1e-5), k
    assert _losses(fsdp)[1] == pytest.approx(_losses(ddp)[1], rel=1e-5)


def test_runs_that_spelled_the_linear_kind_ternary_bool_still_resume(tmp_path):
    """train_args.json before `linear` was the one spelling: {"ternary": false, "linear": null}."""
    run = tmp_path / "fp"
    Trainer(TrainArgs(out=str(run), steps=1, linear="fp", **FAST)).run()
    stored = json.loads((run / "train_args.json").read_text())
    stored.update(ternary=False, linear=None)
    (run / "train_args.json").write_text(json.dumps(stored))
    Trainer(TrainArgs(out=str(run), steps=2, resume=True, linear="fp", **FAST)).run()
    assert json.loads((run / "train_args.json").read_text())["linear"] == "fp"
    assert "ternary" not in json.loads((run / "train_args.json").read_text())
    with pytest.raises(TerditError, match="the model differs"):
        Trainer(TrainArgs(out=str(run), steps=3, resume=True, linear="bitnet", **FAST))


def test_compiled_blocks_train_like_eager_blocks(tmp_path):
    """`--compile` (torch.compile per block) against the eager run of the same seed: the same losses and weights
    up to float rounding, the same checkpoint keys; the blocks really ran compiled."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    Trainer(TrainArgs(out=str(eager), steps=3, **FAST)).run()
    trainer = Trainer(TrainArgs(out=str(compiled), steps=3, compile=True, **FAST))
    trainer.run()
    assert all(block._compiled_call_impl is not None for block in trainer.model.layers)
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), step
    wa = load_tensors(eager / "checkpoints" / "0000003" / "model.safetensors")
    wb = load_tensors(compiled / "checkpoints" / "0000003" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"largest weight difference after 3 steps: {worst:.2e}")
    assert worst < 1e-4  # 3 AdamW steps at lr 5e-4 move weights by up to 1.5e-3


def test_compile_failure_trains_eagerly_with_one_warning(tmp_path, failing_compile):
    """A torch.compile that fails on the first call (a backend error, as with no C++ compiler) gives one warning
    and the eager blocks: the losses and weights of the eager run, bit for bit."""
    eager, failed = tmp_path / "eager", tmp_path / "failed"
    Trainer(TrainArgs(out=str(eager), steps=2, **FAST)).run()
    trainer = Trainer(TrainArgs(out=str(failed), steps=2, compile=True, **FAST))
    with pytest.warns(UserWarning, match="--compile: torch.compile failed") as record:
        trainer.run()
    assert sum("torch.compile failed" in str(w.message) for w in record) == 1
    assert all(block._compiled_call_impl is None for block in trainer.model.layers)
    assert _losses(failed) == _losses(eager)
    wa = load_tensors(eager / "checkpoints" / "0000002" / "model.safetensors")
    wb = load_tensors(failed / "checkpoints" / "0000002" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("extra", [dict(grad_checkpointing=True), dict(parallel="fsdp")])
def test_compile_refuses_what_it_does_not_support_before_writing(tmp_path, extra):
    run = tmp_path / "r"
    with pytest.raises(TerditError, match="--compile"):
        Trainer(TrainArgs(out=str(run), steps=1, compile=True, **FAST, **extra))
    assert not run.exists()
