"""Time every stage's training step and sampling at fixed sizes (DESIGN.md: bench-toy, bench-long).

    python bench.py                         # all stages on the best device, markdown table on stdout
    python bench.py --json out/bench.json   # also write the numbers
    python bench.py --only dalle --device cpu --steps 10
    python bench.py --device cuda --compile  # a GPU: bf16 autocast (--dtype auto), training through torch.compile

For each training step: the median over --steps timed steps after --warmup untimed ones (forward, backward,
AdamW), items/s, tokens/s, achieved GFLOP/s and its fraction of the matrix-multiply peak measured in the same
run on the same device (a large square matmul, median of several), and peak memory. The attention layer alone,
forward and backward, on its SDPA path and written out. Sampling: DALL-E 1 with and without the KV cache; the
unCLIP decoder with 50 DDIM steps and with 1000 DDPM steps. On a CPU, each row that has one of DESIGN.md's
speed targets for the 2-core CPU says whether it is met, or by how much it is missed.

FLOP counts are the usual estimates: 6 · parameters per token for a transformer's matmuls (2 forward, 4
backward) plus 12 · layers · T · C per token for attention scores (Kaplan et al. 2020; nanoGPT's MFU); for
convolutional nets, the forward FLOPs counted by hooks on every Conv2d/Linear, times 3.
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn as nn

from nanodalle import checkpoint, train_utils
from nanodalle.clip import CLIP, CLIPConfig
from nanodalle.dalle import DALLE, DALLEConfig
from nanodalle.diffusion import GaussianDiffusion
from nanodalle.dvae import DVAE, DVAEConfig
from nanodalle.pipeline import decoder_model_fn
from nanodalle.prior import DiffusionPrior, PriorConfig
from nanodalle.transformer import Attention
from nanodalle.unet import UNet, UNetConfig

# bench-toy and bench-long, as fixed in DESIGN.md: do not change them, results are compared over time
SIZES = {
    "dvae": DVAEConfig(image_size=32, group_count=3, n_hid=64, n_init=64, vocab_size=512),
    "clip": CLIPConfig(image_size=32, patch_size=4, vision_width=256, vision_layers=4, vision_heads=8,
                       text_width=256, text_layers=4, text_heads=8, context_length=32, vocab_size=1024,
                       eot_id=1022, embed_dim=256),
    "dalle_toy": DALLEConfig(text_len=32, text_vocab=1024, pad_id=1023, grid_size=8, image_vocab=512, n_layer=4,
                             n_head=8, n_embd=256),
    "dalle_long": DALLEConfig(text_len=64, text_vocab=1024, pad_id=1023, grid_size=16, image_vocab=1024, n_layer=8,
                              n_head=8, n_embd=512),
    # prior: 32 caption-token features of width 256 + 4 tokens
    "prior": PriorConfig(embed_dim=256, text_len=32, text_width=256, n_layer=4, n_head=8, n_embd=256),
    # decoder: base 32, mults 1,2,4, depth 2, 32 px, CLIP embedding 256: 5.8M parameters with its text encoder
    "decoder": UNetConfig(image_size=32, base_channels=32, channel_mults="1,2,4", num_res_blocks=2,
                          attention_resolutions="16,8", clip_dim=256, text_vocab=1024, text_len=32, text_width=192,
                          pad_id=1023),
}


# DESIGN.md's speed targets on the 2-core CPU: (stage, start of the row's `what`) -> (row key, "max" or "min",
# the limit, its unit as printed after it). On a CPU, each such row says whether it is met, or by how much not.
CPU_TARGETS = {
    ("dalle", "train step, bench-long"): ("mfu", "min", 0.85, " of the matmul peak"),
    ("dalle", "sample bench-long, KV cache, batch 1"): ("ms", "max", 7, " ms/token"),
    ("dalle", "sample bench-long, recompute"): ("speedup", "min", 10, "× KV-cache speed-up"),
    ("dalle", "sample bench-long, KV cache, batch 8"): ("ms", "max", 10, " ms/token"),
    ("prior", "train step"): ("ms", "max", 60, " ms"),
    ("decoder", "train step"): ("ms", "max", 360, " ms"),
    ("decoder", "sample 4 images, DDIM"): ("ms", "max", 2500, " ms"),
}


def target_note(row: dict) -> str | None:
    """'target ≤ 7 ms/token: met' or '...: missed, 9.4 (1.34× the limit)' for a row with a CPU target."""
    for (stage, what), (key, kind, limit, unit) in CPU_TARGETS.items():
        if row["stage"] != stage or not row["what"].startswith(what):
            continue
        value = row[key]
        met = value <= limit if kind == "max" else value >= limit
        row["target_met"] = met
        shown, limit_shown = (f"{value:.0%}", f"{limit:.0%}") if key == "mfu" else (f"{value:.1f}", f"{limit:g}")
        sign = "≤" if kind == "max" else "≥"
        verdict = "met" if met else f"missed, {shown} ({value / limit:.2f}× the limit)"
        return f"target {sign} {limit_shown}{unit}: {verdict}"
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul: the ceiling that MFU is measured against."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, steps=7, warmup=2)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def conv_flops(model: nn.Module, *inputs) -> float:
    """Forward FLOPs of the Conv2d and Linear layers, counted with hooks on one forward pass."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += 2 * out.numel() * m.in_features
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return total


def train_step_fn(model, loss_fn, device, dtype, compile_loss: bool = False):
    """One optimizer step: forward, backward, AdamW (the Trainer's settings). compile_loss: the forward and
    loss through torch.compile (--compile; compiled during the warm-up steps, which are not timed)."""
    opt = train_utils.configure_optimizers(model, 1e-4, 0.01, device_type=device.type)
    if compile_loss:
        loss_fn = torch.compile(loss_fn)

    def step():
        with train_utils.autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def transformer_flops_per_token(n_params: int, n_layer: int, T: int, C: int) -> float:
    return 6 * n_params + 12 * n_layer * T * C


# ----------------------------------------------------------------------------------------------------

def bench_dvae(device, dtype, args):
    cfg = SIZES["dvae"]
    model = DVAE(cfg).to(device).to(memory_format=torch.channels_last)
    x = (torch.rand(16, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    step = train_step_fn(model, lambda: model(x, 0.5, 1e-3)[0], device, dtype, args.compile)
    s = timed(step, device, args.steps, args.warmup)
    flops = 3 * conv_flops(model, x, 0.5, 1e-3)
    return [{"stage": "dvae", "what": "train step, bench-toy batch 16", "ms": 1000 * s, "items_s": 16 / s,
             "gflops": flops / s / 1e9}]


def bench_clip(device, dtype, args):
    cfg = SIZES["clip"]
    model = CLIP(cfg).to(device)
    B = 32
    images = torch.rand(B, 3, 32, 32, device=device) * 2 - 1
    tokens = torch.randint(0, 1022, (B, cfg.context_length), device=device)
    tokens[:, -1] = cfg.eot_id
    step = train_step_fn(model, lambda: model(images, tokens), device, dtype, args.compile)
    s = timed(step, device, args.steps, args.warmup)
    n_img, n_txt = train_utils.count_params(model.image_encoder), train_utils.count_params(model.text_encoder)
    T_img = (32 // 4) ** 2 + 1
    flops = B * (T_img * transformer_flops_per_token(n_img, cfg.vision_layers, T_img, cfg.vision_width)
                 + cfg.context_length * transformer_flops_per_token(n_txt, cfg.text_layers, cfg.context_length,
                                                                    cfg.text_width))
    return [{"stage": "clip", "what": "train step, bench-toy batch 32", "ms": 1000 * s, "items_s": B / s,
             "tokens_s": B * (T_img + cfg.context_length) / s, "gflops": flops / s / 1e9}]


def bench_dalle(device, dtype, args):
    rows = []
    for name, B in (("dalle_toy", 16), ("dalle_long", 4)):
        cfg = SIZES[name]
        model = DALLE(cfg).to(device)
        text = torch.randint(0, cfg.text_vocab - 2, (B, cfg.text_len), device=device)
        codes = torch.randint(0, cfg.image_vocab, (B, cfg.image_len), device=device)
        step = train_step_fn(model, lambda: model(text, codes)[0], device, dtype, args.compile)
        s = timed(step, device, args.steps, args.warmup)
        T = cfg.text_len + cfg.image_len
        n = train_utils.count_params(model)
        flops = B * T * transformer_flops_per_token(n, cfg.n_layer, T, cfg.n_embd)
        size = name.split("_")[1]
        rows.append({"stage": "dalle", "what": f"train step, bench-{size} batch {B}", "ms": 1000 * s,
                     "items_s": B / s, "tokens_s": B * T / s, "gflops": flops / s / 1e9})
    # the attention layer alone at bench-long, forward + backward: SDPA against the written-out math. On a CPU
    # in float32: training under CPU bf16 autocast always takes the written-out path (transformer.Attention).
    B, T, C = 4, cfg.text_len + cfg.image_len, cfg.n_embd
    attn = Attention(C, cfg.n_head).to(device)
    x = torch.randn(B, T, C, device=device, requires_grad=True)
    attn_dtype = torch.float32 if device.type == "cpu" else dtype
    times = {}
    for use_sdpa in (True, False):
        def fwd_bwd():
            with train_utils.autocast(device, attn_dtype):
                y = attn(x, causal=True, use_sdpa=use_sdpa)
            y.float().sum().backward()
        times[use_sdpa] = timed(fwd_bwd, device, args.steps, args.warmup)
    for use_sdpa, name in ((True, "SDPA"), (False, "written out")):
        row = {"stage": "dalle", "what": f"attention layer fwd+bwd, bench-long batch {B}, {name}",
               "ms": 1000 * times[use_sdpa], "items_s": B / times[use_sdpa], "tokens_s": B * T / times[use_sdpa],
               "note": str(attn_dtype).replace("torch.", "")}
        if use_sdpa:
            row["note"] += f"; {times[False] / times[True]:.2f}× faster than written out"
        rows.append(row)
    # sampling one image at bench-long, with and without the KV cache (the same codes either way)
    cfg = SIZES["dalle_long"]
    model = DALLE(cfg).to(device).eval()
    for B in (1, 8):
        text = torch.randint(0, cfg.text_vocab - 2, (B, cfg.text_len), device=device)
        with torch.no_grad(), train_utils.autocast(device, args.sample_dtype):
            cached = timed(lambda: model.generate(text), device, max(3, args.steps // 2), 1)
            rows.append({"stage": "dalle", "what": f"sample bench-long, KV cache, batch {B}",
                         "ms": 1000 * cached / cfg.image_len, "unit": "ms/token", "items_s": B / cached,
                         "tokens_s": B * cfg.image_len / cached})
            if B == 1:
                full = timed(lambda: model.generate(text, use_cache=False), device, 2, 0)
                rows.append({"stage": "dalle", "what": "sample bench-long, recompute, batch 1",
                             "ms": 1000 * full / cfg.image_len, "unit": "ms/token", "items_s": 1 / full,
                             "tokens_s": cfg.image_len / full, "speedup": full / cached,
                             "note": f"KV cache speed-up {full / cached:.1f}×"})
    return rows


def bench_prior(device, dtype, args):
    cfg, B = SIZES["prior"], 32
    model = DiffusionPrior(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    image_emb = nn.functional.normalize(torch.randn(B, cfg.embed_dim, generator=g), dim=-1).to(device)
    text_emb = nn.functional.normalize(torch.randn(B, cfg.embed_dim, generator=g), dim=-1).to(device)
    feats = torch.randn(B, cfg.text_len, cfg.text_width, generator=g).to(device)
    pad_mask = torch.ones(B, cfg.text_len, dtype=torch.bool, device=device)
    step = train_step_fn(model, lambda: model(image_emb, text_emb, feats, pad_mask), device, dtype, args.compile)
    s = timed(step, device, args.steps, args.warmup)
    T = cfg.text_len + 4
    flops = B * T * transformer_flops_per_token(train_utils.count_params(model), cfg.n_layer, T, cfg.n_embd)
    return [{"stage": "prior", "what": f"train step, bench-toy batch {B}", "ms": 1000 * s, "items_s": B / s,
             "tokens_s": B * T / s, "gflops": flops / s / 1e9}]


def bench_decoder(device, dtype, args):
    cfg, B = SIZES["decoder"], 16
    model = UNet(cfg).to(device)
    diffusion = GaussianDiffusion(1000, "cosine").to(device)
    x0 = torch.rand(B, 3, 32, 32, device=device) * 2 - 1
    emb = nn.functional.normalize(torch.randn(B, cfg.clip_dim, device=device), dim=-1)
    tokens = torch.randint(0, 1000, (B, cfg.text_len), device=device)
    def loss_fn():
        return diffusion.loss(lambda x, t: model(x, t, emb, tokens), x0)
    step = train_step_fn(model, loss_fn, device, dtype, args.compile)
    s = timed(step, device, args.steps, args.warmup)
    t = torch.zeros(B, dtype=torch.long, device=device)
    flops = 3 * conv_flops(model, x0, t, emb, tokens)
    rows = [{"stage": "decoder", "what": f"train step, bench-toy batch {B}", "ms": 1000 * s, "items_s": B / s,
             "gflops": flops / s / 1e9, "note": f"{train_utils.count_params(model) / 1e6:.1f}M parameters"}]
    # sampling 4 images with guidance (a doubled batch): 50 DDIM steps against 1000 DDPM steps
    model.eval()
    fn = decoder_model_fn(model, emb[:4], tokens[:4], 3.0)
    with torch.no_grad(), train_utils.autocast(device, args.sample_dtype):
        ddim = timed(lambda: diffusion.ddim_sample(fn, (4, 3, 32, 32), 50), device, 3, 1)
        ddpm = timed(lambda: diffusion.ddpm_sample(fn, (4, 3, 32, 32)), device, 1, 0)
    rows.append({"stage": "decoder", "what": "sample 4 images, DDIM 50 steps, guided", "ms": 1000 * ddim,
                 "unit": "ms", "items_s": 4 / ddim})
    rows.append({"stage": "decoder", "what": "sample 4 images, DDPM 1000 steps, guided", "ms": 1000 * ddpm,
                 "unit": "ms", "items_s": 4 / ddpm, "note": f"DDIM-50 is {ddpm / ddim:.1f}× faster"})
    return rows


STAGES = {"dvae": bench_dvae, "clip": bench_clip, "dalle": bench_dalle, "prior": bench_prior,
          "decoder": bench_decoder}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=list(STAGES), action="append", help="bench these stages only (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=7, help="timed steps per measurement (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compile", action="store_true",
                   help="training steps through torch.compile (compiled in the untimed warm-up; slow to start)")
    args = p.parse_args()
    device = train_utils.pick_device(args.device)
    dtype = train_utils.pick_dtype(args.dtype, device)
    # Sampling is timed as sample.py runs it: float32 on the CPU unless --dtype asks otherwise. (bfloat16
    # autocast makes CPU training 1.5-2.1× faster, but KV-cached decoding, which reads every weight once per
    # token, slower: 11.4 against 6.2 ms/token at bench-long, batch 1.)
    args.sample_dtype = torch.float32 if device.type == "cpu" and args.dtype == "auto" else dtype
    torch.manual_seed(0)
    peak = matmul_peak(device, dtype)
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')} (sampling "
          f"{str(args.sample_dtype).replace('torch.', '')}), {torch.get_num_threads()} threads, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name in args.only or list(STAGES):
        for row in STAGES[name](device, dtype, args):
            if "gflops" in row:
                row["mfu"] = row["gflops"] * 1e9 / peak
            row["peak_mem_mb"] = peak_memory_mb(device)
            note = target_note(row) if device.type == "cpu" else None
            if note:
                row["note"] = f"{row['note']}; {note}" if row.get("note") else note
            rows.append(row)
            print(format_row(row), flush=True)
    print("\n| stage | what | time | items/s | tokens/s | GFLOP/s | of matmul peak | peak mem | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    if args.json:
        checkpoint.write_json_atomic({"device": str(device), "dtype": str(dtype),
                                      "sample_dtype": str(args.sample_dtype), "threads": torch.get_num_threads(),
                                      "matmul_peak_gflops": peak / 1e9, "rows": rows}, args.json)


def format_row(r: dict) -> str:
    def num(key, fmt):
        return format(r[key], fmt) if key in r else ""
    return (f"| {r['stage']} | {r['what']} | {r['ms']:.1f} {r.get('unit', 'ms/step')} | {num('items_s', '.1f')} | "
            f"{num('tokens_s', ',.0f')} | {num('gflops', '.1f')} | {num('mfu', '.0%')} | "
            f"{r['peak_mem_mb']:.0f} MB | {r.get('note', '')} |")


if __name__ == "__main__":
    train_utils.main(main)
