"""The memory plan of --dry-run: bytes per GPU of a training run under DDP and under FSDP, before you rent GPUs.

    weights, gradients   4 bytes a parameter each (float32 master copy; autocast computes in bf16)
    AdamW state          8 bytes a parameter (two float32 moments)
    EMA                  4 bytes a parameter, when --ema > 0
    activations          what autograd saves for the backward pass, per batch, found by running the training
                         forward once in float32 on the meta device (no memory) and adding up the tensors it
                         saves; halved under bf16 autocast
    working set          DDP: bf16 copies of the weights that autocast caches during the forward.
                         FSDP: the gathered (unsharded) weights and gradients of the blocks in flight — the
                         root module's for the whole step, and two blocks' (one computing, one prefetched)
    CUDA context         ~1 GB for the CUDA context, kernels and allocator slack

DDP keeps weights, gradients and AdamW state whole on every GPU; FSDP keeps 1/W of them, so at 64 GPUs a 12B
model's 16 bytes a parameter become 3 GB. Activations do not shard: they shrink with the per-GPU batch and
with --grad-ckpt (only each block's input is kept; the largest block's activations are rebuilt at a time).
--measure-memory runs three real steps and prints the measured peak next to the estimate.
"""
import copy
import resource

import torch
import torch.nn as nn

from nanodalle import sharding

GB = 1e9
CONTEXT_BYTES = 1 * GB


def example_loss(stage: str, model: nn.Module, cfg, batch_size: int, device) -> torch.Tensor:
    """A training loss of the stage's model on a random batch of the training shapes (any device, meta too)."""
    B = batch_size
    dtype = next(model.parameters()).dtype
    if stage == "dvae":
        x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
        return model(x, 1.0, 1.0)[0]
    if stage == "clip":
        images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
        tokens = torch.randint(cfg.vocab_size, (B, cfg.context_length), device=device)
        return model(images, tokens)
    if stage == "dalle":
        text = torch.randint(cfg.text_vocab, (B, cfg.text_len), device=device)
        codes = torch.randint(cfg.image_vocab, (B, cfg.grid_size ** 2), device=device)
        return model(text, codes)[0]
    if stage == "prior":
        image_emb = torch.randn(B, cfg.embed_dim, device=device, dtype=dtype)
        text_emb = torch.randn(B, cfg.embed_dim, device=device, dtype=dtype)
        feats = torch.randn(B, cfg.text_len, cfg.text_width, device=device, dtype=dtype)
        pad_mask = torch.zeros(B, cfg.text_len, dtype=torch.bool, device=device)
        return model(image_emb, text_emb, feats, pad_mask)
    # decoder / upsampler: the UNet's prediction at random steps (the MSE's own memory is one image)
    size = cfg.train_crop or cfg.image_size
    x = torch.randn(B, cfg.in_channels, size, size, device=device, dtype=dtype)
    t = torch.randint(cfg.timesteps, (B,), device=device)
    clip_emb = torch.randn(B, cfg.clip_dim, device=device, dtype=dtype) if cfg.clip_dim > 0 else None
    tokens = torch.randint(cfg.text_vocab, (B, cfg.text_len), device=device) if cfg.text_vocab > 0 else None
    low = None
    if cfg.low_res:
        scale = cfg.image_size // cfg.low_res_size
        low = torch.randn(B, cfg.in_channels, size // scale, size // scale, device=device, dtype=dtype)
    return model(x, t, clip_emb, tokens, low_res=low).square().mean()


def activation_bytes(stage: str, model: nn.Module, cfg, batch_size: int) -> dict:
    """Bytes autograd saves for backward in one training forward of `model` (built on the meta device), with
    and without activation checkpointing. Counted once per storage; parameters are not activations."""
    params = {id(p) for p in model.parameters()}
    saved, keep = {}, []  # id(storage base) -> (bytes, index of the block running when saved, or -1)
    current = [-1]
    block_inputs = {}  # id -> bytes of the tensors each block call receives (kept under --grad-ckpt)

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in saved:
            saved[id(base)] = (base.numel() * base.element_size(), current[0])
            keep.append(base)  # keep it alive so its id is not reused
        return t

    def enter(i):
        def hook(module, args, kwargs):
            current[0] = i
            for a in list(args) + list(kwargs.values()):
                if torch.is_tensor(a) and id(a) not in params:
                    block_inputs[id(a)] = a.numel() * a.element_size()
                    keep.append(a)
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = []
    for i, block in enumerate(sharding.blocks(model)):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            example_loss(stage, model.train(), cfg, batch_size, "meta")
    finally:
        for h in handles:
            h.remove()
    outside = sum(b for b, i in saved.values() if i < 0)
    per_block = {}
    for b, i in saved.values():
        if i >= 0:
            per_block[i] = per_block.get(i, 0) + b
    full = outside + sum(per_block.values())
    recompute = outside + sum(block_inputs.values()) + max(per_block.values(), default=0)
    return {"full": full, "grad_ckpt": min(full, recompute)}


def plan(stage: str, make_model, cfg, batch_size: int, world_size: int, bf16: bool, ema: bool,
         grad_ckpt: bool) -> dict:
    """Bytes per GPU, by item, under DDP and under FSDP (see the module docstring)."""
    with torch.device("meta"):
        model = make_model(cfg)
    N = sum(p.numel() for p in model.parameters())
    in_blocks = [sum(p.numel() for p in b.parameters()) for b in sharding.blocks(model)]
    root = N - sum(in_blocks)
    acts = activation_bytes(stage, model, cfg, batch_size)["grad_ckpt" if grad_ckpt else "full"]  # float32
    if bf16:
        acts = acts / 2  # bf16 autocast saves most activations in 2 bytes (norms and softmax stay float32)
    W = world_size
    state = {"weights": 4 * N, "gradients": 4 * N, "AdamW state": 8 * N, "EMA": 4 * N if ema else 0}
    ddp = dict(state, activations=acts, **{"working set": 2 * N if bf16 else 0, "CUDA context": CONTEXT_BYTES})
    unsharded = root + 2 * max(in_blocks, default=0)  # parameters gathered at once
    fsdp = {k: v / W for k, v in state.items()}
    fsdp.update(activations=acts, **{"working set": unsharded * ((2 if bf16 else 4) + 4)},
                **{"CUDA context": CONTEXT_BYTES})
    return {"params": N, "world_size": W, "batch_size": batch_size, "ddp": ddp, "fsdp": fsdp,
            "ddp_total": sum(ddp.values()), "fsdp_total": sum(fsdp.values())}


def print_plan(p: dict, gpu_mem_gb: float, grad_ckpt: bool) -> None:
    print(f"\nmemory plan per GPU: batch {p['batch_size']} per GPU, world size {p['world_size']}, "
          f"{'with' if grad_ckpt else 'without'} --grad-ckpt (GB)")
    print(f"  {'':<14s} {'DDP':>9s} {'FSDP':>9s}")
    for k in p["ddp"]:
        print(f"  {k:<14s} {p['ddp'][k] / GB:9.2f} {p['fsdp'][k] / GB:9.2f}")
    print(f"  {'total':<14s} {p['ddp_total'] / GB:9.2f} {p['fsdp_total'] / GB:9.2f}")
    for name in ("ddp", "fsdp"):
        total = p[f"{name}_total"] / GB
        verdict = "fits" if total <= gpu_mem_gb else "does NOT fit"
        print(f"  {name.upper()}: {total:.1f} GB {verdict} in {gpu_mem_gb:g} GB")


def rss_bytes() -> int:
    """The resident memory of this process now (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def measure(stage: str, make_model, cfg, batch_size: int, device: torch.device, ema: bool, steps: int = 3) -> dict:
    """Peak memory of `steps` real training steps (forward, backward, AdamW) on random batches, above the
    memory in use before the model was built. CUDA: the allocator's peak. CPU: the process's peak RSS, so
    it also counts the allocator's slack and freed memory the OS has not taken back."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss_bytes()
    model = make_model(cfg).to(device).train()
    average = copy.deepcopy(model).requires_grad_(False) if ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        loss = example_loss(stage, model, cfg, batch_size, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 0.001)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    return {"measured": peak}
