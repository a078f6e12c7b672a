"""Checkpoints: written atomically, loaded with a check of their stage, rebuilt into models.

A checkpoint is one torch.save'd dict (format CHECKPOINT_FORMAT): stage, config, model, ema, optimizer,
step, steps, RNG states, the args of the run, and what the stage needs downstream (the tokenizer, the
upstream models' configs and fingerprints). The Trainer writes it (train_utils.py); sampling, evaluation
and the next stages read it with load_checkpoint and model_from_checkpoint. Sharded (--fsdp) runs write a
directory instead (sharding.py); load_checkpoint points at `--consolidate` when it finds one.
"""
import json
import os

import torch
import torch.nn as nn

from nanodalle import UserError, sharding

CHECKPOINT_FORMAT = 1


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the save failed: remove the partial file, keep the old checkpoint
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path: str, stage: str) -> dict:
    """Load a checkpoint on the CPU and check it is a nanodalle checkpoint of the expected stage. A directory
    stands for the ckpt.pt inside it (a training run's --out)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path) and sharding.latest_sharded(os.path.dirname(path) or "."):
        raise UserError(f"no checkpoint at {path}, but a sharded one (an --fsdp run) next to it: make a plain "
                        f"one with python -m nanodalle.sharding --consolidate {os.path.dirname(path) or '.'}")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train that stage first (python train_{stage_script(stage)}.py) "
                        f"or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): pass a ckpt.pt written by nanodalle")
    if not isinstance(ckpt, dict) or "format" not in ckpt or "stage" not in ckpt:
        raise UserError(f"{path} is not a nanodalle checkpoint: pass a ckpt.pt written by a train_*.py script")
    if ckpt["stage"] != stage:
        raise UserError(f"{path} is a '{ckpt['stage']}' checkpoint, but a '{stage}' checkpoint is needed here")
    return ckpt


def resume_state(args, stage: str) -> dict | None:
    """On --resume, the checkpoint OUT/ckpt.pt memory-mapped (its weights are not read), or a sharded one's
    meta.pt: for what a script needs before it builds its Trainer, like the tokenizer. None otherwise; the
    Trainer reports a bad one."""
    if not args.resume:
        return None
    try:
        ckpt = torch.load(os.path.join(args.out, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ckpt = None
    ckpt, _ = sharding.newest(ckpt, args.out)
    return ckpt if isinstance(ckpt, dict) and ckpt.get("stage") == stage else None


def run_tokenizer(args, stage: str):
    """The tokenizer of a run: on --resume the one saved in its checkpoint, else --tokenizer or the shipped one."""
    from nanodalle.tokenizer import Tokenizer
    ckpt = resume_state(args, stage)
    if ckpt is None or "tokenizer" not in ckpt:
        return Tokenizer(args.tokenizer)
    if args.tokenizer is not None:
        raise UserError(f"--resume uses the tokenizer saved in {args.out}/ckpt.pt: drop --tokenizer {args.tokenizer}")
    return Tokenizer.from_state(ckpt["tokenizer"])


def take_facts(cfg, facts: dict, source: str, args) -> None:
    """Config fields that are facts of an upstream model or the tokenizer (codebook size, embedding width...),
    not choices. A new run takes them, and says which preset values they replace. On --resume the config is
    the checkpoint's (the Trainer rebuilds it): call check_facts on it once the Trainer exists."""
    if args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt")):
        return
    changed = {k: (getattr(cfg, k), v) for k, v in facts.items() if getattr(cfg, k) != v}
    if changed:
        print(f"set from {source}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    for k, v in facts.items():
        setattr(cfg, k, v)


def check_facts(cfg, facts: dict, source: str) -> None:
    """A resumed run must be given the upstream models it was trained with: a one-line error naming both."""
    theirs = {k: getattr(cfg, k) for k in facts}
    if theirs != facts:
        given = ", ".join(f"{k} {v}" for k, v in facts.items())
        used = ", ".join(f"{k} {v}" for k, v in theirs.items())
        raise UserError(f"{source} gives {given}, but the run being resumed uses {used}: "
                        f"pass the one it was trained with")


def stage_script(stage: str) -> str:
    return {"dalle": "transformer", "upsampler": "decoder"}.get(stage, stage)


def model_from_checkpoint(ckpt: dict, config_cls, model_cls, use_ema: bool = True) -> nn.Module:
    """Rebuild the model from the config stored in the checkpoint; EMA weights when there are some."""
    model = model_cls(config_cls(**ckpt["config"]))
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model.eval()
