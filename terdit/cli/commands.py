"""Core sub-commands: `configs`, `train`, `sample`."""

from __future__ import annotations

import argparse
import json
import pathlib

from terdit.cli.args import add_device_args, add_overwrite_arg, finite_float, nonneg_float, nonneg_int, positive_int
from terdit.errors import TerditError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the named model configs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("train", help="train a TerDiT from scratch (QAT); no arguments: tiny model on digits",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/digits", help="run folder to write")
    p.add_argument("--config", default="TerDiT-Digits", help="model config name (see `terdit configs`)")
    p.add_argument("--no-ternary", dest="ternary", action="store_false", default=argparse.SUPPRESS,
                   help="full-precision twin (Large-DiT: plain linears, no RMSNorm after adaLN); "
                        "default: ternary block linears")
    p.add_argument("--linear", choices=["fp", "ternary", "bitnet"], default=None,
                   help="block linears: fp, ternary (TerDiT) or bitnet (BitNet b1.58 baseline)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--no-adaln-norm", dest="adaln_norm", action="store_false", default=None,
                      help="drop the RMSNorm after adaLN (the paper's ablation)")
    norm.add_argument("--adaln-norm", dest="adaln_norm", action="store_true", default=None,
                      help="keep the RMSNorm after adaLN in a full-precision model (default: off, as Large-DiT)")
    p.add_argument("--alpha-init", choices=["absmean", "randn", "ones"], default=None,
                   help="initial alpha of ternary layers (config default: absmean)")
    p.add_argument("--qk-norm", action="store_true", help="LayerNorm on q and k")
    p.add_argument("--act-bits", type=int, choices=[8], default=None,
                   help="ternary layers see 8-bit per-token activations (BitNet-style QAT; exact on --policy int8)")
    p.add_argument("--data", default=None, help="image folder or latent folder (default: embedded digits)")
    p.add_argument("--resolution", type=positive_int, default=None, help="image resolution (image folders)")
    p.add_argument("--vae", default=None, help="VAE hub id or local dir for image folders ('none': pixels)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    p.add_argument("--vae-mean", dest="vae_sample", action="store_false",
                   help="encode images with the posterior mean (default: a sample, as DiT)")
    p.add_argument("--class-map", default=None, help="JSON {folder name: class index} for image folders")
    p.add_argument("--strict-data", action="store_true", help="fail on unreadable images instead of skipping")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=finite_float, default=5e-4)
    p.add_argument("--lr-drop-step", type=positive_int, default=None, help="step at which lr drops")
    p.add_argument("--lr-after-drop", type=finite_float, default=1e-4)
    p.add_argument("--ema-decay", type=finite_float, default=None,
                   help="default 0.9999, capped so the EMA horizon is <= 10%% of --steps")
    p.add_argument("--grad-clip", type=nonneg_float, default=2.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=positive_int, default=1000, help="checkpoint every N steps")
    p.add_argument("--ckpt-minutes", type=nonneg_float, default=10.0,
                   help="also checkpoint when this many minutes passed since the last checkpoint (0: never)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--sample-every", type=positive_int, default=None, help="write a sample grid every N steps")
    p.add_argument("--sample-cfg", type=nonneg_float, default=4.0, help="guidance of the sample grids")
    p.add_argument("--sample-steps", type=positive_int, default=250, help="sampling steps of the sample grids")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="under torchrun")
    p.add_argument("--num-workers", type=nonneg_int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--override", action="store_true",
                   help="with --resume: accept model, data, batch or lr settings that differ from the run's")
    p.add_argument("--init-from", default=None, help="start from another run's EMA weights")
    add_device_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a run to a PNG grid or an ADM npz")
    p.add_argument("--run", required=True, help="run folder (or deploy folder)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: 0..min(K,10)-1)")
    p.add_argument("--num-per-class", type=positive_int, default=1)
    p.add_argument("--cfg", type=nonneg_float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-channels", type=positive_int, default=None,
                   help="guide only the first N channels (3 = the public code's quirk; default all)")
    p.add_argument("--steps", type=int, default=250, help="sampling steps")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=nonneg_float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--out", default=None, help=".png grid or .npz (default: RUN/sample.png)")
    add_overwrite_arg(p, "sample file")
    p.add_argument("--vae", default=None, help="VAE to decode latents (default: the one the run trained with)")
    p.add_argument("--policy", choices=["memory", "speed", "int8", "int8-packed"], default="memory",
                   help="packed models: unpack per call (memory), cache unpacked weights (speed), or CPU integer "
                        "compute with 8-bit activations, codes resident (int8) or packed (int8-packed)")
    add_device_args(p)
    p.set_defaults(func=cmd_sample)


def cmd_configs(args: argparse.Namespace) -> int:
    import torch

    from terdit.models import CONFIGS, TerDiT, get_config

    rows = []
    for name in CONFIGS:
        cfg = get_config(name)
        with torch.device("meta"):
            counts = TerDiT(cfg).parameter_counts()
        rows.append({"name": name, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.n_heads,
                     "input": f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels}", **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'name':<14} {'dim':>5} {'depth':>5} {'heads':>5} {'input':>9} {'params':>14} {'ternary':>14}")
        for r in rows:
            print(f"{r['name']:<14} {r['dim']:>5} {r['depth']:>5} {r['heads']:>5} {r['input']:>9} "
                  f"{r['total']:>14,} {r['ternary']:>14,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from terdit.models.configs import get_config
    from terdit.training.trainer import TrainArgs, train

    get_config(args.config)  # an unknown name fails here, before anything is written
    fields = {k: v for k, v in vars(args).items() if k in TrainArgs.__dataclass_fields__}
    fields["precision"] = args.dtype
    last = train(TrainArgs(**fields))
    if last:
        samples = pathlib.Path(args.out) / "samples.png"
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; run in {args.out}"
              + (f"; samples: {samples}" if samples.is_file() else ""))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from terdit.io import check_output
    from terdit.loading.serving import load_for_sampling
    from terdit.models.memory import check_batch_fits
    from terdit.sampling.generate import check_sampling_args, generate, save_samples

    out = Path(args.out) if args.out else Path(args.run) / "sample.png"
    if out.suffix.lower() not in (".png", ".npz"):
        raise TerditError(f"--out {out}: must end in .png (grid) or .npz (ADM arrays)")
    # before sampling: a refused or unwritable --out must not cost the whole run first
    check_output(out, own=lambda p: p.is_file() and p.suffix.lower() == out.suffix.lower(),
                 kind=f"{out.suffix.lower()} file", overwrite=args.overwrite, folder=False)
    model, decode, map_labels = load_for_sampling(args.run, ema=args.ema, device=args.device, dtype=args.dtype,
                                                  vae=args.vae, policy=args.policy)
    classes = args.classes if args.classes is not None else list(range(min(model.config.num_classes, 10)))
    check_sampling_args(model.config.num_classes, classes, args.cfg, args.steps, args.cfg_channels,
                        model.config.in_channels)
    check_batch_fits(model.config, 2 * len(classes) * args.num_per_class, next(model.parameters()).device,
                     f"--num-per-class {args.num_per_class}")
    labels = [c for c in classes for _ in range(args.num_per_class)]
    dtype = next(model.parameters()).dtype
    images = generate(model, map_labels(labels), decode=decode, cfg_scale=args.cfg, steps=args.steps,
                      sampler=args.sampler, eta=args.eta, seed=args.seed, guide_channels=args.cfg_channels,
                      dtype=dtype if dtype != torch.float32 else None, progress=True)
    save_samples(images, labels, out, nrow=args.num_per_class if args.num_per_class > 1 else None)
    print(f"wrote {len(labels)} samples to {out}")
    return 0
