"""terdit.diffusion.sampler: the one sampling loop and its backends, on CPU.

The cuda-graph backend's control flow (pre-drawn noise, capture after warm-up, replay for every index but 0,
index 0 eagerly, callbacks, the fallback of "auto") runs here with the capture replaced by an eager stand-in
that replays the step the graph would hold; its samples must equal the eager backend's bitwise."""

import pytest
import torch

from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.diffusion import sampler as sm
from terdit.errors import TerditError
from terdit.models import TerDiT, get_config


def _model_fn(channels_out: int):
    """A deterministic stand-in for a network: output depends on x and on the timestep it is given."""
    w = torch.linspace(-0.5, 0.5, 4 * channels_out).view(channels_out, 4)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,nchw->nohw", w.to(x.dtype), x)
        return torch.tanh(h + 1e-3 * t.view(-1, 1, 1, 1).to(x.dtype))

    return fn


class _FakeGraph:
    """What a captured graph does on replay: static_x <- step(static_x, idx, static_z, last=False)."""

    def __init__(self, step, static_x, static_z, idx):
        self.args = step, static_x, static_z, idx
        self.replays: list[int] = []

    def replay(self) -> None:
        step, static_x, static_z, idx = self.args
        self.replays.append(int(idx.item()))
        static_x.copy_(step(static_x, idx, static_z, False))


@pytest.fixture
def fake_cuda_graph(monkeypatch):
    """cuda-graph on CPU: backend resolution allows it, capture returns a _FakeGraph (after the warm-up calls)."""
    real = sm.resolve_backend
    made: list[_FakeGraph] = []

    def resolve(backend, device):
        real(backend, "cuda")  # the same validation
        return "eager" if backend == "eager" else "cuda-graph"

    def capture(step, static_x, static_z, idx, z0, warmup):
        static_z.copy_(z0)
        for _ in range(max(1, warmup)):
            step(static_x, idx, static_z, False)
        made.append(_FakeGraph(step, static_x, static_z, idx))
        return made[-1]

    import terdit.sampling.pipeline as pipeline  # it checks the backend itself, with the name it imported

    monkeypatch.setattr(sm, "resolve_backend", resolve)
    monkeypatch.setattr(pipeline, "resolve_backend", resolve)
    monkeypatch.setattr(sm, "_capture", capture)
    return made


def test_backend_names_and_resolution():
    assert sm.resolve_backend("auto", "cpu") == "eager"
    assert sm.resolve_backend("auto", torch.device("cuda", 0)) == "cuda-graph"
    assert sm.resolve_backend("eager", "cuda") == "eager"
    assert sm.resolve_backend("cuda-graph", "cuda:1") == "cuda-graph"
    with pytest.raises(TerditError, match="backend.*CUDA"):
        sm.resolve_backend("cuda-graph", "cpu")
    with pytest.raises(TerditError, match="backend must be one of auto, eager, cuda-graph"):
        sm.resolve_backend("graph", "cpu")
    d = GaussianDiffusion.create(3)
    with pytest.raises(TerditError, match="backend"):
        d.sample(_model_fn(8), torch.zeros(1, 4, 2, 2), backend="cuda-graph")


def test_predrawn_rows_are_the_eager_draws_in_order():
    gen = torch.Generator().manual_seed(3)
    zs = sm.predraw(lambda: torch.randn(2, 3, generator=gen), 4, torch.bfloat16)
    ref = torch.Generator().manual_seed(3)
    assert zs.shape == (4, 2, 3) and zs.dtype == torch.bfloat16
    for k in range(4):
        assert torch.equal(zs[k], torch.randn(2, 3, generator=ref).to(torch.bfloat16))


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.8)])
@pytest.mark.parametrize("steps", [1, 2, 6])
def test_cuda_graph_loop_equals_eager(fake_cuda_graph, learn_sigma, sampler, eta, steps):
    d = GaussianDiffusion.create(steps, learn_sigma=learn_sigma)
    fn = _model_fn(8 if learn_sigma else 4)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))

    def run(backend):
        return d.sample(fn, x, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(9), backend=backend)

    eager, graph = run("eager"), run("cuda-graph")
    assert torch.equal(graph, eager)
    if steps > 1:  # one capture; every index but 0 replayed, from steps - 1 down
        (g,) = fake_cuda_graph
        assert g.replays == list(range(steps - 1, 0, -1))
    else:  # one step: index 0 only, no capture
        assert not fake_cuda_graph


def test_cuda_graph_loop_feeds_noise_rows_in_order_and_runs_index_0_eagerly(fake_cuda_graph):
    calls = []

    def step(x, idx, noise, last):
        calls.append((int(idx.item()), last, noise.clone()))
        return x + noise if not last else x * 2

    rows = [torch.full((1, 2), float(k)) for k in range(4)]
    it = iter(rows)
    out = sm.run_loop(step, torch.zeros(1, 2), 4, lambda: next(it), backend="cuda-graph", warmup=2)
    warm, rest = calls[:2], calls[2:]
    assert [(i, last) for i, last, _ in warm] == [(3, False), (3, False)]  # warm-up: index steps-1, results dropped
    assert [(i, last) for i, last, _ in rest] == [(3, False), (2, False), (1, False), (0, True)]
    assert [float(z[0, 0]) for _, _, z in rest[:3]] == [0.0, 1.0, 2.0]  # row k at loop step k
    assert torch.equal(out, torch.full((1, 2), 6.0))  # (0 + 1 + 2) * 2


def test_cuda_graph_callbacks_get_copies_and_may_replace(fake_cuda_graph):
    seen = []

    def on_step(k, i, x):
        seen.append((k, i))
        x.fill_(100.0)  # a copy: must not disturb the loop
        return torch.zeros_like(x) if k == 1 else None

    def step(x, idx, noise, last):
        return x + 1

    out = sm.run_loop(step, torch.zeros(2), 4, lambda: torch.zeros(2), backend="cuda-graph", on_step=on_step)
    assert seen == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert torch.equal(out, torch.full((2,), 2.0))  # replaced by zeros after step 2, then two more steps
    eager = sm.run_loop(step, torch.zeros(2), 4, lambda: torch.zeros(2), backend="eager",
                        on_step=lambda k, i, x: torch.zeros_like(x) if k == 1 else None)
    assert torch.equal(out, eager)


def test_failed_capture_falls_back_under_auto_only(monkeypatch):
    monkeypatch.setattr(sm, "resolve_backend", lambda b, d: "eager" if b == "eager" else "cuda-graph")

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sm, "_capture", broken)
    d = GaussianDiffusion.create(4)
    fn, x = _model_fn(8), torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def run(backend):
        return d.sample(fn, x, sampler="ddpm", generator=torch.Generator().manual_seed(5), backend=backend)

    with pytest.warns(UserWarning, match="sampling eagerly"):
        got = run("auto")
    assert torch.equal(got, run("eager"))
    with pytest.raises(TerditError, match="backend='cuda-graph'"):
        run("cuda-graph")


def test_sample_latents_backends_agree(fake_cuda_graph):
    """The whole path (guidance with guide_channels, a TerDiT): cuda-graph gives sample_latents' eager samples."""
    from terdit.sampling.generate import generate, sample_latents

    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro"))
    kw = dict(cfg_scale=3.0, steps=4, seed=2, guide_channels=1)
    eager = sample_latents(model, [1, 2], backend="eager", **kw)
    assert torch.equal(sample_latents(model, [1, 2], backend="cuda-graph", **kw), eager)
    assert torch.equal(generate(model, [1, 2], backend="auto", **kw), eager)  # auto: eager on CPU
    with pytest.raises(TerditError, match="backend"):
        sample_latents(model, [1], steps=2, backend="fast")


def test_one_step_helpers_are_the_loops_step():
    """ddpm_step / ddim_step (single steps, used by tests against formulas) run the loop's step function."""
    d = GaussianDiffusion.create(5)
    fn = guided_model_fn(_GuidedStandIn(), torch.tensor([0, 1]), 2.0, 3)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    for i in (4, 2, 0):
        idx = torch.tensor([i])
        assert torch.equal(d.ddpm_step(fn, x, i, z), d.reverse_step(fn, 2, "cpu")(x, idx, z, i == 0))
        got = d.ddim_step(fn, x, i, z, eta=0.3)
        assert torch.equal(got, d.reverse_step(fn, 2, "cpu", "ddim", 0.3)(x, idx, z, i == 0))
    with pytest.raises(TerditError, match="sampler"):
        d.sample(fn, x, sampler="euler")


class _GuidedStandIn(torch.nn.Module):
    def forward(self, x, t, y, return_dict=False):
        return (torch.cat([x, x], dim=1) * 0.1 + y.view(-1, 1, 1, 1) * 0.01 + t.view(-1, 1, 1, 1) * 1e-4,)


def test_pipeline_backends(fake_cuda_graph):
    """The pipeline's own sampler runs the same loop: cuda-graph equals eager, with a callback and per-image
    generators; a diffusers scheduler refuses cuda-graph; a bad name is refused by name."""
    from random_models import random_micro

    from terdit.sampling.pipeline import TerDiTPipeline, diffusers_scheduler

    pipe = TerDiTPipeline(random_micro(0, std=0.02))
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, list] = {"eager": [], "cuda-graph": []}

    def run(backend):
        def cb(p, i, t, kw):
            seen[backend].append((i, t))
            return {"latents": kw["latents"] * 0.5} if i == 1 else {}

        gens = [torch.Generator().manual_seed(k) for k in range(2)]
        return pipe([1, 2], num_inference_steps=4, generator=gens, output_type="latent", backend=backend,
                    callback_on_step_end=cb).images

    assert torch.equal(run("cuda-graph"), run("eager"))
    assert len(fake_cuda_graph) == 1  # the graph backend really ran
    assert seen["cuda-graph"] == seen["eager"] and [i for i, _ in seen["eager"]] == [0, 1, 2, 3]
    with pytest.raises(TerditError, match="backend must be"):
        pipe([1], num_inference_steps=2, output_type="latent", backend="fast")
    pipe.scheduler = diffusers_scheduler("DDIMScheduler")
    with pytest.raises(TerditError, match="backend='cuda-graph' runs terdit's own sampler"):
        pipe([1], num_inference_steps=2, output_type="latent", backend="cuda-graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_real_cuda_graph_equals_eager():  # pragma: no cover - GPU only
    from terdit.sampling.generate import sample_latents

    torch.manual_seed(0)
    model = TerDiT(get_config("TerDiT-Micro")).cuda()
    kw = dict(cfg_scale=3.0, steps=5, seed=4)
    eager = sample_latents(model, [1, 2], backend="eager", **kw)
    graph = sample_latents(model, [1, 2], backend="cuda-graph", **kw)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(sample_latents(model, [1, 2], **kw), graph)  # auto: cuda-graph on CUDA
