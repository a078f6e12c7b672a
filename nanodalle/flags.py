"""The command line shared by every train_*.py: the common flags of DESIGN.md, then one flag per field of
the stage's model config, with defaults that depend on the preset (--size).

    parser = flags.make_parser("dvae", description, DVAEConfig, PRESETS, TRAIN)
    args = parser.parse_args()
    cfg = flags.config_from_args(DVAEConfig, PRESETS, args)   # the preset, with the user's overrides
"""
import argparse
import dataclasses

from nanodalle import UserError


# training settings a preset may set (train_defaults in each train_*.py); these apply where it does not
GLOBAL_TRAIN_DEFAULTS = dict(steps=1000, batch_size=32, lr=3e-4, min_lr_frac=0.1, weight_decay=0.0, ema=0.0,
                             grad_clip=1.0)


def make_parser(stage: str, description: str, config_cls, presets: dict, train_defaults: dict):
    """The common flags of every train_*.py, then one --flag per field of the model's config dataclass.

    Flags whose default depends on --size default to None here and are filled in by config_from_args;
    their help lists the value per preset. train_defaults: {"toy": dict(steps=2000, lr=1e-3), ...}.
    """
    def per_preset(key, values: dict) -> str:  # "toy: 64, small: 128, full: 256" (or one value)
        shown = {name: values.get(name, {}).get(key, GLOBAL_TRAIN_DEFAULTS.get(key)) for name in presets}
        if len(set(map(str, shown.values()))) == 1:
            return f"default: {next(iter(shown.values()))}"
        return "default: " + ", ".join(f"{name} {v}" for name, v in shown.items())

    def preset_default(key):
        return per_preset(key, train_defaults)

    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("common")
    g.add_argument("--size", default="toy", help=f"model preset: {', '.join(presets)} (default: toy)")
    g.add_argument("--data", default="shapes",
                   help="'shapes' (built in, the default), a folder of images + .txt captions, or .tar shards")
    g.add_argument("--out", default=f"out/{stage}",
                   help=f"output directory: ckpt.pt, log.jsonl, metrics.json, grids (default: out/{stage})")
    g.add_argument("--steps", type=int, help=f"optimizer steps ({preset_default('steps')})")
    g.add_argument("--batch-size", type=int, help=f"images per step per process ({preset_default('batch_size')})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate ({preset_default('lr')})")
    g.add_argument("--min-lr-frac", type=float, help=f"the cosine ends at lr × this ({preset_default('min_lr_frac')})")
    g.add_argument("--warmup", type=int, help="linear warm-up steps (default: 2%% of --steps)")
    g.add_argument("--weight-decay", type=float,
                   help=f"AdamW weight decay of ≥2-D weights ({preset_default('weight_decay')})")
    g.add_argument("--grad-clip", type=float, help=f"clip the global grad norm, 0: off ({preset_default('grad_clip')})")
    g.add_argument("--ema", type=float, help=f"EMA decay of the weights, 0: off ({preset_default('ema')})")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda, then mps, then cpu (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 autocast where the hardware has it: CUDA (else float16) and CPUs with "
                        "AVX512-BF16 or AMX; float32 on other CPUs and on MPS")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines (default: 50)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations + checkpoints (default: steps / 4)")
    g.add_argument("--num-workers", type=int,
                   help="DataLoader worker processes (default: 0 on CPU and MPS, up to 8 per GPU on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dry-run", action="store_true",
                   help="build on the meta device, print config, size and the memory plan (below), exit")
    s = p.add_argument_group("scaling (launch with torchrun --nproc_per_node N for several GPUs)")
    s.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the processes (FSDP), not DDP")
    s.add_argument("--cpu-offload", action="store_true", help="with --fsdp: keep the shards and the optimizer on the CPU")
    s.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing: keep each block's input, recompute its activations in backward")
    s.add_argument("--world-size", type=int,
                   help="--dry-run: plan memory for this many GPUs (default: $WORLD_SIZE, else 1)")
    s.add_argument("--gpu-mem", type=float, default=80, help="--dry-run: GB of memory per GPU (default: 80)")
    s.add_argument("--measure-memory", action="store_true",
                   help="--dry-run: also train 3 steps on synthetic batches on --device and compare the peak")
    p.set_defaults(_stage=stage, _train_defaults=train_defaults)
    c = p.add_argument_group(f"model config: override a field of the preset ({config_cls.__name__})")
    for f in dataclasses.fields(config_cls):
        type_name = f.type if isinstance(f.type, str) else f.type.__name__  # "int", "float", "str", "bool"
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(type_name, str)
        fallback = {name: {f.name: presets[name].get(f.name, f.default)} for name in presets}
        c.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, type=kind, default=None,
                       metavar=type_name.upper(), help=f"({per_preset(f.name, fallback)})")
    return p


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_from_args(config_cls, presets: dict, args):
    """The preset named by --size, with every config flag the user gave applied on top.

    Also fills the training defaults (steps, batch size, lr, ...) of that preset into args.
    """
    if args.size not in presets:
        raise UserError(f"unknown preset --size {args.size!r}: choose one of {', '.join(presets)}")
    values = dict(presets[args.size])
    for f in dataclasses.fields(config_cls):
        given = getattr(args, "cfg_" + f.name)
        if given is not None:
            values[f.name] = given
    for key, value in args._train_defaults.get(args.size, {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in GLOBAL_TRAIN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = args.steps // 50
    if args.eval_every is None:
        args.eval_every = max(args.steps // 4, 1)
    return config_cls(**values)


def check_diffusion(timesteps: int, schedule: str, predict: str, shift: float = 1.0) -> None:
    """A one-line UserError for diffusion settings that GaussianDiffusion refuses (--schedule, --predict,
    --timesteps, --schedule-shift), raised before anything is built or written."""
    from nanodalle.diffusion import GaussianDiffusion
    try:
        GaussianDiffusion(timesteps, schedule, predict, shift)
    except ValueError as e:
        raise UserError(str(e)) from None
