"""The shared training runtime: every train_*.py uses it unchanged.

What lives here, in the order a training script meets it:
  dry_run      build the model on the meta device, print its size and memory plan, allocate nothing
  Trainer      device and dtype, torchrun/DDP or FSDP (sharding.py), seeding, optimizer, LR schedule, EMA,
               gradient accumulation, atomic checkpoints and --resume, logging
  save_grid    image grids, used by the training scripts and by sampling
  main         run a script: a UserError becomes one line on stderr and exit status 2
Next to it: flags.py (the command line), checkpoint.py (saving, loading, rebuilding models), sharding.py
(FSDP), memory.py (the --dry-run memory plan).

A training script defines `loss_fn(model, batch, step) -> (loss, logs)` and `evaluate(step) -> metrics`
and calls `Trainer.fit`. The loop itself is ~40 lines below (`Trainer.fit`), written out in full.
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from nanodalle import UserError, sharding
from nanodalle.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic, write_json_atomic

# ----------------------------------------------------------------------------------------------------
# the model before training


def dry_run(make_model: Callable[[object], nn.Module], cfg, args, stage: str) -> None:
    """Build the model on the meta device (no memory is allocated), print its config and size, and the memory
    plan per GPU for --batch-size and --world-size under DDP and FSDP (memory.py). With --measure-memory,
    also train 3 steps on random batches on --device and print the measured peak beside the estimate."""
    from nanodalle import memory
    with torch.device("meta"):
        model = make_model(cfg)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    for name, child in model.named_children():
        print(f"  {name:<24s} {count_params(child) / 1e6:10.2f}M parameters")
    n = count_params(model)
    print(f"total: {n:,} parameters ({n / 1e6:.1f}M)")
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    bf16 = args.dtype in ("auto", "bfloat16")  # the default on GPUs
    plan = memory.plan(stage, make_model, cfg, args.batch_size, world_size, bf16, args.ema > 0, args.grad_ckpt)
    memory.print_plan(plan, args.gpu_mem, args.grad_ckpt)
    if args.measure_memory:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        mixed = dtype == torch.bfloat16
        estimate = memory.plan(stage, make_model, cfg, args.batch_size, 1, mixed, args.ema > 0, False)
        expected = estimate["ddp_total"] - memory.CONTEXT_BYTES  # the measurement does not see the context
        with autocast(device, dtype):
            measured = memory.measure(stage, make_model, cfg, args.batch_size, device, args.ema > 0)["measured"]
        print(f"\nmeasured on {device} ({str(dtype).replace('torch.', '')}, one process, 3 steps, batch "
              f"{args.batch_size}): peak {measured / memory.GB:.3f} GB above the start; the plan's estimate "
              f"{expected / memory.GB:.3f} GB; measured / estimate {measured / expected:.2f}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# device, dtype and distributed set-up

def pick_device(name: str) -> torch.device:
    """auto: cuda -> mps -> cpu. An explicit device that is not available is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here (macOS with Apple silicon only); use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16: AMD Zen 4+, Intel Cooper Lake+; or AMX: Intel
    Sapphire Rapids+)? Read from Linux's /proc/cpuinfo; False elsewhere. Without them bfloat16 is emulated,
    slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 autocast where the hardware does it natively: CUDA GPUs that support it (else float16),
    and CPUs with AVX512-BF16 or AMX, where it makes a training step 1.5-2.1× faster (README, efficiency
    notes); float32 on other CPUs and on MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# optimizer, schedule, EMA

def configure_optimizers(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8,
                         device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with weight decay on ≥2-D weights only (matmul and conv weights, embeddings); biases, norms
    and scalars are not decayed. Fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=(device_type == "cuda"))


def lr_at(step: int, lr: float, warmup: int, steps: int, min_lr_frac: float) -> float:
    """Linear warm-up to lr, then a cosine down to lr · min_lr_frac at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


class EMA:
    """An exponential moving average of the weights (DDPM uses 0.9999), kept in float32.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages do not remember the random init.
    """

    def __init__(self, model: nn.Module, decay: float, blank: nn.Module | None = None):
        """blank: a model of the same structure to hold the average (FSDP: sharded the same way, since FSDP
        modules cannot be deep-copied); a deep copy of `model` by default."""
        self.decay = decay
        self.updates = 0
        if blank is None:
            self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        else:
            self.model = blank.eval().requires_grad_(False)
            with torch.no_grad():
                for p_ema, p in zip(self.model.parameters(), model.parameters()):
                    p_ema.copy_(p)

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.float() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------------
# images

def save_grid(images: torch.Tensor, path: str, nrow: int = 8, pad: int = 2) -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid, nrow images per row."""
    from PIL import Image
    images = images.detach().float().cpu().clamp(-1, 1)
    N, C, H, W = images.shape
    ncol = min(nrow, N)
    rows = math.ceil(N / ncol)
    grid = torch.ones(C, rows * (H + pad) + pad, ncol * (W + pad) + pad)  # white background
    for i in range(N):
        r, c = divmod(i, ncol)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top:top + H, left:left + W] = (images[i] + 1) / 2
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (rows·H, cols·W, C)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(array.squeeze(-1) if C == 1 else array).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Owns everything about a training run except the model's loss and its evaluation.

    Set-up order: torchrun env -> device/dtype -> seed -> output dir checks -> model -> optimizer -> resume
    -> DDP/compile wrappers. `self.raw_model` is the plain module (saved, evaluated, EMA'd); `self.model`
    may be wrapped by DDP and torch.compile (used for the training forward only).
    """

    def __init__(self, args, stage: str, cfg, make_model: Callable[[object], nn.Module], betas=(0.9, 0.999),
                 eps: float = 1e-8, extra_state: dict | None = None):
        self.args, self.stage, self.cfg = args, stage, cfg
        self.extra_state = extra_state or {}  # saved in every checkpoint: tokenizer, upstream models...
        # --- torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without it we are a single process
        self.distributed = int(os.environ.get("RANK", -1)) != -1
        self.fsdp = args.fsdp  # shard (FSDP) rather than replicate (DDP) across the processes
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0  # only the master process logs and writes files
        self.device = pick_device(args.device)
        if self.fsdp and not self.distributed:
            raise UserError("--fsdp shards over the processes that torchrun starts: launch with torchrun "
                            "--nproc_per_node N (N = 1 is fine) " + os.path.basename(sys.argv[0]) + " --fsdp ...")
        if args.cpu_offload and not self.fsdp:
            raise UserError("--cpu-offload offloads FSDP shards: add --fsdp (and launch with torchrun)")
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            # a long evaluation on the master makes the other ranks wait at the next collective: allow it
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))
        self.dtype = pick_dtype(args.dtype, self.device)
        if args.num_workers is None:  # decoding images must keep up with a GPU; on a CPU it would compete
            per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            args.num_workers = min(8, max(per_process - 1, 0)) if self.device.type == "cuda" else 0
        if self.fsdp and self.dtype == torch.float16:
            raise UserError("--fsdp trains in bfloat16 or float32 (float16 would need a sharded grad scaler): "
                            "pass --dtype bfloat16")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.dtype == torch.float16))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for float32 work
            torch.backends.cudnn.allow_tf32 = True
        # --- the output directory: never overwrite a checkpoint unless asked to resume it
        self.out = args.out
        self.ckpt_path = os.path.join(self.out, "ckpt.pt")
        resume_ckpt, resume_sharded = None, sharding.latest_sharded(self.out)  # plain dict / sharded directory
        if args.resume:
            resume_ckpt = load_checkpoint(self.ckpt_path, stage) if os.path.exists(self.ckpt_path) else None
            resume_ckpt, resume_sharded = sharding.newest(resume_ckpt, self.out)  # the newer of the two
            if resume_ckpt is None:
                raise UserError(f"--resume: no checkpoint at {self.ckpt_path}; drop --resume to start a new run")
            if resume_ckpt["stage"] != stage:
                raise UserError(f"{self.out} holds a '{resume_ckpt['stage']}' run, not '{stage}': pick its --out")
            if self.fsdp and resume_sharded is None:
                raise UserError(f"{self.ckpt_path} was written by an unsharded run: resume it without --fsdp")
            self.cfg = cfg = type(cfg)(**resume_ckpt["config"])  # the run's own config wins over flags
        elif os.path.exists(self.ckpt_path) or resume_sharded is not None:
            existing = self.ckpt_path if os.path.exists(self.ckpt_path) else resume_sharded
            raise UserError(f"{existing} already exists: pass --resume to continue it, or --out DIR "
                            f"for a new run (delete it yourself to start over)")
        # --- seed: every rank starts from the same weights; data order differs by rank via the loader
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        self.make_model = make_model
        self.raw_model = make_model(self.cfg).to(self.device)  # on --resume, the checkpoint's config
        if args.grad_ckpt:
            sharding.checkpoint_blocks(self.raw_model)
        self.ema, self._gathered = None, None  # _gathered: the whole model, on the master, while evaluating
        if self.fsdp:
            sharding.shard(self.raw_model, self.dtype, args.cpu_offload)
            if args.ema > 0:  # FSDP modules cannot be deep-copied: shard a second model the same way
                blank = sharding.shard(make_model(self.cfg).to(self.device), self.dtype, args.cpu_offload)
                self.ema = EMA(self.raw_model, args.ema, blank)
        elif args.ema > 0:
            self.ema = EMA(self.raw_model, args.ema)
        fused_ok = self.device.type == "cuda" and not args.cpu_offload  # fused AdamW needs the state on CUDA
        self.optimizer = configure_optimizers(self.raw_model, args.lr, args.weight_decay, betas, eps,
                                              "cuda" if fused_ok else "cpu")
        self.step = 0
        if resume_ckpt is not None:
            self._restore(resume_ckpt, resume_sharded)
            if self.master:
                self._truncate_log()
        self.model = self.raw_model
        if self.distributed and not self.fsdp:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if args.compile:
            self.model = torch.compile(self.model)
        if self.master:
            os.makedirs(self.out, exist_ok=True)
            n = count_params(self.raw_model)
            print(f"{stage}: {n:,} parameters ({n / 1e6:.2f}M) | device {self.device} | dtype "
                  f"{str(self.dtype).replace('torch.', '')} | world size {self.world_size}"
                  f"{' (FSDP)' if self.fsdp else ' (DDP)' if self.distributed else ''} | "
                  f"{'resuming at step ' + str(self.step) if resume_ckpt else 'new run'} -> {self.out}")

    def master_builds(self, paths: dict, build: Callable[[str, str], dict]) -> dict:
        """{split: build(split, path)} computed by the master process alone (encode a data set once, not once
        per GPU), saved at paths[split] by `build`; the other ranks wait for it, then read the files."""
        caches = {}
        if self.master:
            os.makedirs(self.out, exist_ok=True)
            caches = {split: build(split, path) for split, path in paths.items()}
        if self.distributed:
            dist.barrier()
            if not self.master:
                caches = {split: torch.load(path, weights_only=True) for split, path in paths.items()}
        return caches

    # --- the loop --------------------------------------------------------------------------------

    def fit(self, batches: Iterator, loss_fn: Callable, evaluate: Callable[[int], dict] | None = None):
        """Train until args.steps. loss_fn(model, batch, step) -> (loss, {name: scalar tensor}).

        Logs every --log-every steps; evaluates and saves a checkpoint every --eval-every steps and at
        the end. Logged numbers are read back from the device only on log steps (no sync per step).
        """
        args = self.args
        bar = tqdm(total=args.steps, initial=self.step, disable=not self.master, desc=self.stage,
                   dynamic_ncols=True, leave=False)
        t0, t0_step = time.time(), self.step
        while self.step < args.steps:
            lr = lr_at(self.step, args.lr, args.warmup, args.steps, args.min_lr_frac)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(args.grad_accum):
                batch = self.to_device(next(batches))
                # reduce the gradients across processes only on the last micro-batch of the step
                sync = not self.distributed or micro == args.grad_accum - 1
                if self.fsdp:
                    self.raw_model.set_requires_gradient_sync(sync)
                with (contextlib.nullcontext() if sync or self.fsdp else self.model.no_sync()):
                    with autocast(self.device, self.dtype):
                        loss, logs = loss_fn(self.model, batch, self.step)
                    self.scaler.scale(loss / args.grad_accum).backward()
            self.scaler.unscale_(self.optimizer)
            max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
            grad_norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.raw_model)
            self.step += 1
            bar.update(1)
            last = self.step == args.steps
            if self.step % args.log_every == 0 or last:
                dt = (time.time() - t0) / max(self.step - t0_step, 1)
                items = args.batch_size * args.grad_accum * self.world_size
                record = {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": sharding.scalar(grad_norm),
                          "ms_per_step": 1000 * dt, "items_per_s": items / dt}
                record.update({k: sharding.scalar(v) for k, v in logs.items()})
                self.log(record, bar)
                t0, t0_step = time.time(), self.step
            if self.step % args.eval_every == 0 or last:
                if evaluate is not None and (self.master or self.fsdp):  # FSDP: every rank helps gather
                    metrics = {"step": self.step, **self.run_evaluation(evaluate)}
                    if self.master:
                        write_json_atomic(metrics, os.path.join(self.out, "metrics.json"))
                        bar.write(" | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
                self.save()
                t0, t0_step = time.time(), self.step  # do not count evaluation time as step time
        bar.close()
        if self.distributed:
            dist.destroy_process_group()

    def to_device(self, batch):
        """Move the tensors of a batch (a tensor, or a tuple/list/dict holding some) to the device."""
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch

    def log(self, record: dict, bar=None):
        if not self.master:
            return
        line = (f"step {record['step']} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm "
                f"{record['grad_norm']:.3f} | {record['ms_per_step']:.0f} ms/step | "
                f"{record['items_per_s']:.1f} items/s")
        (bar.write if bar is not None else print)(line)
        with open(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- checkpoints -------------------------------------------------------------------------------

    def eval_model(self) -> nn.Module:
        """The weights to evaluate and sample with: the EMA when there is one (under FSDP, while evaluating,
        a whole copy of them gathered onto the master)."""
        if self._gathered is not None:
            return self._gathered
        return self.ema.model if self.ema is not None else self.raw_model

    def run_evaluation(self, evaluate: Callable[[int], dict]) -> dict:
        """evaluate(step) with eval_model() in eval mode (no dropout) and no gradients; its mode is restored after.

        Under FSDP every rank calls this: the weights are gathered onto the master's CPU (a collective), the
        master evaluates a plain copy on its device, and the other ranks return {} at once."""
        if self.fsdp:
            state = sharding.full_state_dict(self.ema.model if self.ema is not None else self.raw_model)
            if not self.master:
                return {}
            self._gathered = self.make_model(self.cfg)
            self._gathered.load_state_dict(state)
            self._gathered.to(self.device)
        model = self.eval_model()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return evaluate(self.step)
        finally:
            model.train(was_training)
            self._gathered = None

    def save(self):
        """Every rank calls this. DDP: the master writes OUT/ckpt.pt while the others wait. FSDP: every rank
        writes its shards to OUT/sharded/ (sharding.save_sharded); nothing is gathered."""
        meta = {  # everything but the weights and optimizer state
            "format": CHECKPOINT_FORMAT, "stage": self.stage, "config": dataclasses.asdict(self.cfg),
            "ema_updates": self.ema.updates if self.ema is not None else 0, "scaler": self.scaler.state_dict(),
            "step": self.step, "steps": self.args.steps,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "args": {k: v for k, v in vars(self.args).items() if not k.startswith("_")},
            **self.extra_state,
        }
        ema_model = self.ema.model if self.ema is not None else None
        if self.fsdp:
            sharding.save_sharded(self.out, self.step, self.raw_model, self.optimizer, ema_model,
                                  {**meta, "has_ema": ema_model is not None}, self.master)
            return
        if self.master:
            save_atomic({**meta, "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "ema": ema_model.state_dict() if ema_model is not None else None}, self.ckpt_path)
        if self.distributed:
            dist.barrier()

    def _truncate_log(self):
        """After a kill, log.jsonl may hold steps past the checkpoint: drop them (and a half-written line)."""
        path = os.path.join(self.out, "log.jsonl")
        if not os.path.exists(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def _restore(self, ckpt: dict, sharded_path: str | None):
        """ckpt: a plain checkpoint, or the meta.pt of the sharded one at sharded_path (whose tensors DCP loads
        into this run's model, sharded or not, at any world size)."""
        ema_model = self.ema.model if self.ema is not None else None
        if sharded_path is not None:
            has_ema = ckpt.get("has_ema") and ema_model is not None
            sharding.load_sharded(sharded_path, self.raw_model, self.optimizer, ema_model if has_ema else None)
        else:
            self.raw_model.load_state_dict(ckpt["model"])
            if ckpt["optimizer"] is None:  # consolidated from a sharded run: its optimizer state stayed there
                print(f"warning: {self.ckpt_path} has no optimizer state (consolidated): AdamW restarts from zero")
            else:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if ema_model is not None and ckpt.get("ema") is not None:
                ema_model.load_state_dict(ckpt["ema"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.updates = ckpt["ema_updates"]
        self.step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(fn: Callable[[], None]) -> None:
    """Run a script's main(): a UserError is one line on stderr and exit status 2, no traceback."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint on disk is intact; continue with --resume", file=sys.stderr)
        sys.exit(130)
