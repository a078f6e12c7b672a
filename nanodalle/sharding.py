"""Training past one GPU: FSDP sharding, activation checkpointing, and sharded checkpoints.

The papers' sizes do not fit data parallelism. DDP keeps a full copy of the weights (4 bytes a parameter),
the gradients (4) and AdamW's two moments (8) on every GPU: 16 bytes × 12B parameters = 192 GB for DALL-E's
transformer before a single activation. FSDP (PyTorch's `fully_shard`) splits every parameter across the W
processes instead, so each GPU holds 16/W bytes a parameter; a block's full weights exist only while it runs
(all-gathered in bf16 just before, freed just after), and its gradients are reduce-scattered back to shards.

    Trainer(--fsdp)                          every train_*.py, launched by torchrun
      checkpoint_blocks(model)               --grad-ckpt: keep each block's input, recompute the rest
      shard(model)                           fully_shard each block, then the root (embeddings, heads)
      save_sharded / load_sharded            torch.distributed.checkpoint: each rank writes its own shards
    python -m nanodalle.sharding --consolidate OUT    sharded checkpoint -> plain OUT/ckpt.pt for sample.py

A "block" is the unit that is sharded and recomputed: a transformer Block, a UNet ResBlock or
AttentionBlock, a dVAE encoder/decoder block. Everything else belongs to the root module.
A sharded checkpoint is a directory OUT/sharded/step_<N>/ (DCP's files plus meta.pt with the config,
step, RNG state, tokenizer...), and OUT/sharded/latest names the newest complete one: a directory is
renamed into place only after every rank has written it, so a kill never leaves a broken checkpoint.
It can be loaded by any number of processes (DCP reshards on load), including one without torchrun.
"""
import argparse
import os
import shutil
import sys
import types
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.utils.checkpoint import checkpoint

from nanodalle import UserError


def block_types() -> tuple:
    from nanodalle.dvae import EncoderBlock  # DecoderBlock is a subclass
    from nanodalle.transformer import Block
    from nanodalle.unet import AttentionBlock, ResBlock
    return (Block, ResBlock, AttentionBlock, EncoderBlock)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, in the order they are registered."""
    return [m for m in model.modules() if isinstance(m, block_types())]


def model_classes(stage: str):
    """(config class, model class) of a stage: what a checkpoint's config is rebuilt into."""
    from nanodalle.clip import CLIP, CLIPConfig
    from nanodalle.dalle import DALLE, DALLEConfig
    from nanodalle.dvae import DVAE, DVAEConfig
    from nanodalle.prior import DiffusionPrior, PriorConfig
    from nanodalle.unet import UNet, UNetConfig
    return {"dvae": (DVAEConfig, DVAE), "clip": (CLIPConfig, CLIP), "dalle": (DALLEConfig, DALLE),
            "prior": (PriorConfig, DiffusionPrior), "decoder": (UNetConfig, UNet),
            "upsampler": (UNetConfig, UNet)}[stage]


# ----------------------------------------------------------------------------------------------------
# activation checkpointing

def _recomputed_forward(self, *args, **kwargs):
    # Keep only the block's inputs now; autograd re-runs the block's forward when the backward pass reaches it
    # (with the same RNG state, so dropout draws the same mask). Costs one more forward, saves its activations.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """--grad-ckpt: activation checkpointing per block. The block's forward is replaced on the instance only
    (a bound method, so a copy of the model recomputes its own weights); parameter names are unchanged."""
    for block in blocks(model):
        block.forward = types.MethodType(_recomputed_forward, block)
    return model


# ----------------------------------------------------------------------------------------------------
# sharding

def shard(model: nn.Module, dtype: torch.dtype, cpu_offload: bool = False) -> nn.Module:
    """fully_shard every block, then the root. In place: the parameters become DTensors holding 1/W each.

    bf16 training: the gathered weights and the gradients are bf16 on the wire and in the matmuls, the
    gradients are reduced (summed over ranks) in float32, and the sharded master weights stay float32.
    cpu_offload: the shards, their gradients and the optimizer step live in CPU memory (slower, fits more)."""
    try:  # torch >= 2.6; 2.4 and 2.5 have the same API under _composable
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise UserError(f"--fsdp needs PyTorch's fully_shard (torch >= 2.4; this is {torch.__version__}): "
                            f"upgrade torch, or train without --fsdp (DDP)") from None
    kwargs = {}
    if dtype == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict:
    """The whole state dict, gathered onto rank 0's CPU (a collective: every rank must call it; the other
    ranks get {}). For evaluation and sampling, which need the whole model on one device anyway."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def scalar(x) -> float:
    """A logged number: the whole value of a DTensor (e.g. the grad norm of sharded gradients)."""
    return float(x.full_tensor()) if hasattr(x, "full_tensor") else float(x)


# ----------------------------------------------------------------------------------------------------
# sharded checkpoints

def sharded_dir(out: str) -> str:
    return os.path.join(out, "sharded")


def latest_sharded(out: str) -> str | None:
    """The directory of OUT's newest complete sharded checkpoint, or None."""
    pointer = os.path.join(sharded_dir(out), "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(sharded_dir(out), f.read().strip())
    return path if os.path.isfile(os.path.join(path, "meta.pt")) else None


def read_meta(path: str) -> dict:
    """meta.pt of a sharded checkpoint: the nanodalle checkpoint dict without its tensors."""
    return torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)


def newest(ckpt: dict | None, out: str) -> tuple[dict | None, str | None]:
    """What --resume continues in OUT: (the sharded checkpoint's meta.pt, its directory) when there is one at
    least as new as the plain checkpoint `ckpt` (a consolidated copy has the same step), else (ckpt, None)."""
    path = latest_sharded(out)
    if path is not None:
        meta = read_meta(path)
        if not isinstance(ckpt, dict) or meta["step"] >= ckpt.get("step", -1):
            return meta, path
    return ckpt, None


def save_sharded(out: str, step: int, model: nn.Module, optimizer, ema_model: nn.Module | None, meta: dict,
                 master: bool) -> None:
    """Every rank writes its own shards of the weights, optimizer state and EMA (nothing is gathered);
    the master writes meta.pt, renames the finished directory into place and updates `latest`."""
    from nanodalle.checkpoint import save_atomic  # (checkpoint imports this module)
    name = f"step_{step:08d}"
    final = os.path.join(sharded_dir(out), name)
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if ema_model is not None:
        state["ema"] = get_model_state_dict(ema_model)
    dcp.save(state, checkpoint_id=tmp)  # returns on every rank once all ranks have written
    if master:
        save_atomic(meta, os.path.join(tmp, "meta.pt"))
        if os.path.isdir(final):  # this step is on disk already (the same state): keep that one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        pointer = os.path.join(sharded_dir(out), "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(name + "\n")
        os.replace(pointer + ".tmp", pointer)
        for old in os.listdir(sharded_dir(out)):  # keep only the newest
            if old.startswith("step_") and old != name:
                shutil.rmtree(os.path.join(sharded_dir(out), old), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load_sharded(path: str, model: nn.Module, optimizer=None, ema_model: nn.Module | None = None) -> None:
    """Load a sharded checkpoint into a model (sharded or not, any world size), its optimizer and EMA."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["model"], state["optimizer"] = get_state_dict(model, optimizer)
    if ema_model is not None:
        state["ema"] = get_model_state_dict(ema_model)
    with warnings.catch_warnings():  # one process without torchrun is a supported way to load: no warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)  # fills the tensors in place, each rank its own shards
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])
    if ema_model is not None:
        set_model_state_dict(ema_model, state["ema"])


def consolidate(out: str, dest: str | None = None) -> str:
    """Sharded checkpoint of OUT -> one plain checkpoint file (default OUT/ckpt.pt) that sample.py and the
    next stages read. One process; the weights and EMA are read shard by shard into a model built on the CPU.
    The optimizer state stays in the sharded checkpoint: resume from that (any world size)."""
    from nanodalle.checkpoint import save_atomic
    path = latest_sharded(out)
    if path is None:
        raise UserError(f"no sharded checkpoint in {out} (expected {sharded_dir(out)}/latest): pass the --out "
                        f"directory of a run trained with --fsdp")
    meta = read_meta(path)
    config_cls, model_cls = model_classes(meta["stage"])
    model = model_cls(config_cls(**meta["config"]))
    ema = model_cls(config_cls(**meta["config"])) if meta.get("has_ema") else None
    load_sharded(path, model, None, ema)
    dest = dest or os.path.join(out, "ckpt.pt")
    ckpt = {k: v for k, v in meta.items() if k != "has_ema"}
    ckpt.update(model=model.state_dict(), ema=ema.state_dict() if ema is not None else None, optimizer=None,
                consolidated_from=os.path.abspath(path))
    save_atomic(ckpt, dest)
    return dest


def main():
    p = argparse.ArgumentParser(description="Sharded checkpoints (--fsdp runs) -> one plain checkpoint file.")
    p.add_argument("--consolidate", metavar="OUT", required=True, help="the --out directory of a sharded run")
    p.add_argument("--to", metavar="PATH", help="where to write the plain checkpoint (default: OUT/ckpt.pt)")
    args = p.parse_args()
    dest = consolidate(args.consolidate, args.to)
    print(f"wrote {dest}")


if __name__ == "__main__":
    from nanodalle.train_utils import main as run_main
    run_main(main)
    sys.exit(0)
