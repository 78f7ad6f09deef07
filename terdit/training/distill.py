"""`terdit distill`: ternarize a pretrained full-precision diffusion transformer with no training data.

The student is `ternarize_` of a copy of the teacher (so it starts as the teacher's ternary PTQ) and learns to
reproduce the teacher's output, noise prediction and learned variance, on noisy inputs x_t = q(x_t | x_0) built
from a pool of x_0 the *teacher itself* drew (data-free, as 1.58-bit FLUX). The pool:

* holds `pool_size` samples, classes balanced, drawn with DDIM (`pool_steps` steps) at the guidance scales
  `pool_cfg` in turn (unguided samples cover the conditional model's distribution, guided ones the region
  sampling at that scale visits);
* is redrawn after the training loop has passed over it `pool_reuse` times, from a seed that is a pure function
  of (seed, round), so a resumed run redraws the very same pool and resume stays exact. Cost of one round:
  pool_size * pool_steps * 1 to 2 teacher forwards (2 where guided), against pool_reuse * pool_size / batch_size
  training steps of 3 forward-equivalents each. Every process draws the whole pool (no communication).

Timesteps are uniform over the 1000 training steps, labels are replaced by the null class with probability
`uncond_prob` so the student learns the unconditional output guidance needs. `--data` replaces the pool by
real images or latents (the targets are still the teacher's outputs).

Everything else is `terdit train`'s Trainer (DDP, EMA, exact resume, TensorBoard, checkpoints, progress):
`Distiller` overrides its four seams (config, data, model, loss). The log's "mse" is the noise-prediction
match, "vb" the learned-variance match.

Teachers: anything `TerDiT.from_pretrained` opens (its student is an ordinary terdit run: sample, evaluate,
export, info work on it), or a diffusers transformer (local folder or Hub id, `--subfolder`; a pipeline repo
uses its transformer/). A diffusers student's run stores the diffusers config and the ternarized layer names;
`load_student` rebuilds it; `terdit.deploy.foreign.export_foreign` / `load_foreign` pack it and load it back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from terdit.data import TrainingData
from terdit.data.base import derived_seed
from terdit.defaults import nonneg_float, positive_int, setting
from terdit.diffusion import GaussianDiffusion
from terdit.diffusion.gaussian import mean_flat
from terdit.errors import TerditError
from terdit.io import atomic_write_text, read_json
from terdit.models import runs as runlib
from terdit.models.configs import TerDiTConfig
from terdit.quant.module_swap import add_adaln_norm_, names_filter, paper_filter, ternarize_
from terdit.training.trainer import TrainArgs, Trainer

DISTILL_FILE = "distill.json"
_POOL = 3  # key space of the pool seeds (train.py uses 1 and 2)


def model_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The output tensor of any class-conditional diffusion transformer called as model(x, t, y).

    terdit's TerDiT and diffusers' DiTTransformer2DModel both take (hidden_states, timestep, class_labels)
    positionally; the result may be a tensor, a tuple or an output object with `.sample`."""
    out = model(x, t, y)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TerditError(f"{type(model).__name__} returned {type(out).__name__}, not a tensor or an output with .sample")


@dataclass
class StudentSpec:
    """What rebuilds a distilled student: the terdit config, or a diffusers class + config + ternary layers.

    Trainer stores it as RUN/config.json (`save`) and sampling reads num_classes, in_channels, input_size,
    learn_sigma from it."""

    class_name: str
    model_config: dict[str, Any]
    num_classes: int
    in_channels: int
    input_size: int
    learn_sigma: bool
    ternary_layers: list[str] = field(default_factory=list)

    KEY = "terdit_distilled_student"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({self.KEY: dataclasses.asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StudentSpec:
        raw = read_json(path)
        if not isinstance(raw, dict) or cls.KEY not in raw:
            raise TerditError(f"{path}: not a distilled diffusers student's config")
        return cls(**raw[cls.KEY])

    def diffusers_class(self) -> type:
        import diffusers

        cls = getattr(diffusers, self.class_name, None)
        if cls is None:
            raise TerditError(f"diffusers has no model class {self.class_name!r}")
        return cls

    def build(self) -> nn.Module:
        """The student's architecture with its ternary layers (weights uninitialised: load a checkpoint)."""
        model = self.diffusers_class().from_config(self.model_config)
        ternarize_(model, names_filter(self.ternary_layers))
        return model


class SampleView(nn.Module):
    """A model called as (x, t, y) -> tensor, with the `.config` terdit's samplers read (num_classes, ...)."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__()
        self.model, self.config = model, config
        self.eval()  # samplers restore the mode they found: a view made in train mode would put the model in it

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_dict: bool = True) -> Any:
        """The contract of terdit's and diffusers' DiT models: an output with `.sample`, or a 1-tuple."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = model_output(self.model, x, t, y)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# -- teachers ------------------------------------------------------------------------------------------------
def _diffusers_class_name(config_file: Path | None) -> str | None:
    """The `_class_name` of a diffusers config.json when diffusers has that class, else None."""
    if config_file is None or not Path(config_file).is_file():
        return None
    import diffusers

    name = read_json(config_file).get("_class_name")
    return name if isinstance(name, str) and hasattr(diffusers, name) else None


def _find_diffusers(name: str, subfolder: str | None) -> tuple[str, str | None] | None:
    """(class name, subfolder) when `name` is a diffusers transformer (local or Hub), else None."""
    from terdit.loading.hub import hub_file
    from terdit.loading.open import hub_model_subfolder
    from terdit.models.kinds import CONFIG_FILE, TRANSFORMER, Kind, is_hub_id, kind_of

    local = Path(name).expanduser()
    if local.is_dir():
        if subfolder is None and kind_of(local) is Kind.PIPELINE:
            subfolder = TRANSFORMER
        cls = _diffusers_class_name(local / (subfolder or "") / CONFIG_FILE)
        return (cls, subfolder) if cls else None
    if local.exists() or not is_hub_id(name):
        return None  # terdit's loader gives the error
    subfolder = hub_model_subfolder(name, subfolder)
    prefix = f"{subfolder}/" if subfolder else ""
    cls = _diffusers_class_name(hub_file(name, prefix + CONFIG_FILE, required=False))
    return (cls, subfolder) if cls else None


def _terdit_config(model: nn.Module) -> TerDiTConfig:
    cfg = model.config
    if isinstance(cfg, TerDiTConfig):
        return cfg
    return TerDiTConfig.from_model_config(dict(cfg))


def load_teacher(name: str, subfolder: str | None = None, device: str | torch.device = "cpu",
                 ) -> tuple[nn.Module, TerDiTConfig | StudentSpec]:
    """The teacher in eval mode, frozen, and the config its student will have (before ternarization)."""
    found = _find_diffusers(name, subfolder)
    if found is None:
        from terdit.models.terdit import TerDiT

        teacher = TerDiT.from_pretrained(name, subfolder=subfolder, device=device)
        cfg = _terdit_config(teacher)
        return teacher.eval().requires_grad_(False), dataclasses.replace(cfg, linear="ternary")
    cls_name, sub = found
    import diffusers

    teacher = getattr(diffusers, cls_name).from_pretrained(name, subfolder=sub, torch_dtype=torch.float32)
    conf = dict(teacher.config)
    if not conf.get("num_embeds_ada_norm") or "sample_size" not in conf:
        raise TerditError(f"{name}: {cls_name} is not a class-conditional transformer (distill supports DiT-style "
                          f"class conditioning; ternarize_ alone works on any model)")
    in_c = int(conf["in_channels"])
    spec = StudentSpec(
        class_name=cls_name, model_config={**conf, "_class_name": cls_name},
        num_classes=int(conf["num_embeds_ada_norm"]), in_channels=in_c, input_size=int(conf["sample_size"]),
        learn_sigma=int(conf.get("out_channels") or in_c) == 2 * in_c,
        ternary_layers=[n for n, m in teacher.named_modules() if paper_filter(m, n)],
    )
    spec.model_config.pop("_use_default_values", None)
    return teacher.to(device).eval().requires_grad_(False), spec


def make_student(teacher: nn.Module, spec: TerDiTConfig | StudentSpec) -> nn.Module:
    """A ternarized copy of the teacher (paper filter), trainable, with label dropout off (labels are explicit)."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    ternarize_(student, names_filter(spec.ternary_layers) if isinstance(spec, StudentSpec) else paper_filter)
    if isinstance(spec, TerDiTConfig) and spec.adaln_norm and not _terdit_config(teacher).adaln_norm:
        add_adaln_norm_(student)
    if isinstance(spec, TerDiTConfig) and hasattr(student, "register_to_config"):
        student.register_to_config(**spec.model_kwargs())  # the student's own config: ternary, adaLN norm
    for m in student.modules():  # TerDiT's LabelEmbedder and diffusers' LabelEmbedding
        if hasattr(m, "embedding_table") and hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return student


# -- the teacher's sample pool -------------------------------------------------------------------------------
class TeacherPool(Dataset):
    """x_0 drawn by the teacher, addressed by virtual index (terdit.data.base's contract); redrawn each round."""

    def __init__(self, teacher: nn.Module, spec: TerDiTConfig | StudentSpec, size: int, reuse: int, steps: int,
                 cfgs: list[float], seed: int, device: torch.device, chunk: int = 256) -> None:
        self.view = SampleView(teacher, spec)
        self.size, self.reuse, self.steps, self.cfgs, self.seed, self.device = size, reuse, steps, cfgs, seed, device
        self.chunk = chunk
        self.num_classes = spec.num_classes
        self._round: int | None = None
        self._x = self._y = torch.empty(0)

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def draw(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round r's pool: item k has class (k + r * size) mod K, guidance cfgs[k mod len(cfgs)]; a pure function
        of r, so a resumed run redraws the same pool."""
        from terdit.sampling.generate import sample_latents

        labels = (torch.arange(self.size) + r * self.size) % self.num_classes  # every class over the rounds
        scales = torch.tensor([self.cfgs[k % len(self.cfgs)] for k in range(self.size)])
        xs = torch.empty(self.size, self.view.config.in_channels, self.view.config.input_size,
                         self.view.config.input_size)
        for j, scale in enumerate(self.cfgs):
            idx = torch.nonzero(scales == scale).flatten()
            for lo in range(0, len(idx), self.chunk):
                part = idx[lo:lo + self.chunk]
                seed = derived_seed(self.seed, _POOL, r, j, lo)
                xs[part] = sample_latents(self.view, labels[part], cfg_scale=scale, steps=self.steps, sampler="ddim",
                                          seed=seed, device=self.device).cpu()
        return xs, labels

    def __getitem__(self, v: int) -> tuple[torch.Tensor, int]:
        epoch, i = divmod(int(v), self.size)
        r = epoch // self.reuse
        if self._round != r:
            self._x, self._y = self.draw(r)
            self._round = r
        return self._x[i], int(self._y[i])


# -- the trainer -----------------------------------------------------------------------------------------------
@dataclass
class DistillArgs:
    """What `terdit distill` adds to `terdit train`'s arguments; stored in RUN/distill.json."""

    teacher: str = setting("", "terdit run/model dir, diffusers transformer dir or Hub id", required=True)
    subfolder: str | None = setting(None, "subfolder of --teacher holding the transformer")
    pool_size: int = setting(1024, "teacher samples per pool", type=positive_int)
    pool_reuse: int = setting(8, "passes over a pool before it is redrawn", type=positive_int)
    pool_steps: int = setting(20, "DDIM steps the teacher samples with", type=positive_int)
    pool_cfg: list[float] = setting(help="guidance of pool samples", type=nonneg_float, nargs="+",
                                    default_factory=lambda: [1.0, 4.0])
    uncond_prob: float = setting(0.1, "fraction of null-class targets", type=nonneg_float)
    adaln_norm: bool = setting(  # terdit teachers: add TerDiT's RMSNorm after the ternary adaLN (add_adaln_norm_)
        False, "terdit teachers: add TerDiT's RMSNorm after each ternary adaLN (the paper's fix for inflated "
        "modulation; on the digits teacher ternarize_ did not inflate it)")

    def validate(self) -> None:
        checks = [
            (bool(self.teacher), "teacher is required"),
            (self.pool_size >= 1, f"pool_size must be >= 1, got {self.pool_size}"),
            (self.pool_reuse >= 1, f"pool_reuse must be >= 1, got {self.pool_reuse}"),
            (1 <= self.pool_steps <= 1000, f"pool_steps must be in [1, 1000], got {self.pool_steps}"),
            (bool(self.pool_cfg) and all(c >= 0 for c in self.pool_cfg), f"pool_cfg must be >= 0: {self.pool_cfg}"),
            (0 <= self.uncond_prob < 1, f"uncond_prob must be in [0, 1), got {self.uncond_prob}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TerditError(msg)


class Distiller(Trainer):
    """`terdit train`'s Trainer with the teacher as the only source of supervision."""

    def __init__(self, args: TrainArgs, distill: DistillArgs) -> None:
        args.num_workers = 0  # the pool is drawn by the teacher in this process (it may live on the GPU)
        distill.validate()
        super().__init__(args)
        path = self.out / DISTILL_FILE
        if self.args.resume:
            stored = read_json(path) if path.is_file() else None
            if stored is None:
                raise TerditError(f"{self.out}: not a distill run (no {DISTILL_FILE}); resume it with `terdit train`")
            distill = DistillArgs(**stored)
        local = Path(distill.teacher).expanduser()
        if local.exists():  # a resumed run must find its teacher from any working directory
            distill.teacher = str(local.resolve())
        self.distill = distill
        self.teacher, self.spec = load_teacher(distill.teacher, distill.subfolder, self.device)
        if distill.adaln_norm:
            if not isinstance(self.spec, TerDiTConfig):
                raise TerditError("adaln_norm: only terdit teachers have the adaLN layout it extends")
            self.spec = dataclasses.replace(self.spec, adaln_norm=True)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(dataclasses.asdict(distill), indent=2) + "\n")
        self.null_class = self.spec.num_classes

    # -- the seams ----------------------------------------------------------------------------------------------
    def _load_config(self) -> Any:
        path = self.out / runlib.CONFIG_FILE
        raw = read_json(path)
        return StudentSpec.load(path) if StudentSpec.KEY in raw else runlib.load_config(self.out)

    def _build_config(self, data: TrainingData) -> Any:
        c, h, _ = data.sample_shape
        spec = self.spec
        if (c, h) != (spec.in_channels, spec.input_size) or data.num_classes > spec.num_classes:
            raise TerditError(f"data gives {c}x{h}x{h} samples of {data.num_classes} classes; the teacher takes "
                              f"{spec.in_channels}x{spec.input_size}x{spec.input_size} and {spec.num_classes}")
        return spec

    def _open_data(self) -> TrainingData:
        a, dd, spec = self.args, self.distill, self.spec
        if a.data:
            return super()._open_data()
        pool = TeacherPool(self.teacher, spec, dd.pool_size, dd.pool_reuse, dd.pool_steps, dd.pool_cfg, a.seed,
                           self.device)
        shape = (spec.in_channels, spec.input_size, spec.input_size)
        return TrainingData(pool, spec.num_classes, shape,
                            description=f"{dd.pool_size} samples of the teacher {dd.teacher}, redrawn every "
                                        f"{dd.pool_reuse} passes")

    def _build_model(self, cfg: Any) -> nn.Module:
        return make_student(self.teacher, cfg)

    def _losses(self, model: nn.Module, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return distill_losses(model, self.teacher, diffusion, x, t, noise, y, self.null_class,
                              self.distill.uncond_prob)

    def _wrap(self, model: nn.Module, ema: nn.Module) -> tuple[nn.Module, nn.Module]:
        if self.dist.enabled and self.args.parallel == "fsdp" and not hasattr(model, "layers"):
            raise TerditError("parallel fsdp shards terdit's blocks; for a diffusers student use ddp")
        return super()._wrap(model, ema)

    def _sample_grid(self, ema: nn.Module, path: Path, writer, step: int) -> None:
        view = ema if isinstance(self.config, TerDiTConfig) else SampleView(ema, self.config)
        super()._sample_grid(view, path, writer, step)


def distill_losses(student: nn.Module, teacher: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, null_class: int, uncond_prob: float,
                   ) -> dict[str, torch.Tensor]:
    """Per-sample MSE between student and teacher outputs on x_t: "mse" the noise channels, "vb" the variance."""
    xt = diffusion.q_sample(x0, t, noise).to(x0.dtype)
    tt = diffusion.model_timesteps(t)
    if uncond_prob > 0:
        y = torch.where(torch.rand(y.shape, device=y.device) < uncond_prob, torch.full_like(y, null_class), y)
    with torch.no_grad():
        target = model_output(teacher, xt, tt, y).float()
    out = model_output(student, xt, tt, y).float()
    c = x0.shape[1]
    terms = {"mse": mean_flat((out[:, :c] - target[:, :c]) ** 2)}
    if out.shape[1] > c:
        terms["vb"] = mean_flat((out[:, c:] - target[:, c:]) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    return terms


def distill(args: TrainArgs, distill_args: DistillArgs) -> dict[str, Any]:
    """Distill (or resume) a run; returns the last logged metrics."""
    return Distiller(args, distill_args).run()


# -- a diffusers student after training ------------------------------------------------------------------------
def load_student(run: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """A distilled student from its run folder: a TerDiT (terdit teacher) or the diffusers class, in eval mode."""
    path = runlib.require_run(run)
    raw = read_json(path / runlib.CONFIG_FILE)
    if StudentSpec.KEY not in raw:
        return runlib.load_run_model(path, ema=ema, device=str(device))
    model = StudentSpec.load(path / runlib.CONFIG_FILE).build()
    runlib.load_weights_into(model, runlib.latest_checkpoint(path) / ("ema.safetensors" if ema else
                                                                      "model.safetensors"))
    return model.to(device).eval()
