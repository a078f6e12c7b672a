"""Tests for nanodalle/dvae.py: the Gumbel-softmax relaxation, the KL term, the logit-Laplace likelihood,
the full-size parameter count (a dry run that allocates nothing), and the model's shapes and loss.

Every check compares against a closed form or an independent computation (numpy, written out by hand).
Models are tiny (n_hid 8, K 32) and run on one thread, so the file takes a few seconds on a CPU.
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from nanodalle import dvae
from nanodalle.dvae import (DVAE, DVAEConfig, PRESETS, cosine, gumbel_softmax, kl_to_uniform,
                            logit_laplace_nll, map_pixels, unmap_pixels)

TINY = dict(n_hid=8, vocab_size=32, n_init=8)




def np_kl_to_uniform(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """log K − H(softmax(logits)), in float64 numpy, written independently of the code under test."""
    z = np.moveaxis(logits.astype(np.float64), axis, -1)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    return math.log(z.shape[-1]) - entropy


# ----------------------------------------------------------------------------------------------------
# Gumbel-softmax


@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_gumbel_softmax_soft_samples_on_simplex(tau):
    torch.manual_seed(0)
    logits = 3 * torch.randn(16, 10, 5, 5)
    out = gumbel_softmax(logits, tau)
    assert out.shape == logits.shape
    assert (out >= 0).all()
    assert torch.allclose(out.sum(1), torch.ones(16, 5, 5), atol=1e-6, rtol=0)
    # a relaxed sample, not a one-hot (at τ = 4 no position is anywhere near one-hot)
    if tau == 4.0:
        assert out.max(1).values.max() < 0.999
    # dim= is honoured: the same numbers laid out with K last
    torch.manual_seed(1)
    out_last = gumbel_softmax(logits.permute(0, 2, 3, 1).contiguous(), tau, dim=-1)
    assert torch.allclose(out_last.sum(-1), torch.ones(16, 5, 5), atol=1e-6, rtol=0)


def test_gumbel_softmax_hard_is_one_hot_with_straight_through_gradient():
    torch.manual_seed(0)
    base = 2 * torch.randn(32, 12, 3, 3)
    w = torch.randn(32, 12, 3, 3)
    tau = 0.7

    def run(hard):
        logits = base.clone().requires_grad_(True)
        torch.manual_seed(123)  # the same Gumbel noise for both
        out = gumbel_softmax(logits, tau, hard=hard)
        (w * out).sum().backward()
        return out.detach(), logits.grad

    hard_out, hard_grad = run(True)
    soft_out, soft_grad = run(False)
    # exact one-hots (1 − s + s is exactly 1 in floating point, −s + s exactly 0)
    assert ((hard_out == 0) | (hard_out == 1)).all()
    assert (hard_out.sum(1) == 1).all()
    # ...at the argmax of the relaxed sample drawn with the same noise
    assert torch.equal(hard_out.argmax(1), soft_out.argmax(1))
    assert not torch.equal(hard_out, soft_out)
    # straight-through: the gradient is exactly the relaxed sample's
    assert soft_grad.abs().sum() > 0
    assert torch.equal(hard_grad, soft_grad)
    # and it is the softmax Jacobian applied to w, computed by hand: (1/τ) s ⊙ (w − <w, s>)
    expected = soft_out * (w - (w * soft_out).sum(1, keepdim=True)) / tau
    assert torch.allclose(soft_grad, expected, atol=1e-5, rtol=1e-4)


def test_gumbel_max_frequencies_match_softmax():
    """At τ = 1, argmax softmax(logits + g) = argmax(logits + g) is an exact draw from softmax(logits)."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
    n = 20_000
    samples = gumbel_softmax(logits.repeat(n, 1), tau=1.0, dim=1)       # (n, K)
    counts = torch.bincount(samples.argmax(1), minlength=len(logits)).double()
    freq = counts / n
    p = torch.softmax(logits.double(), 0)
    se = torch.sqrt(p * (1 - p) / n)
    assert ((freq - p).abs() <= 4 * se).all(), (freq, p)
    # chi-square with K − 1 = 5 degrees of freedom: P(χ² > 25) ≈ 1.4e-4
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 25, chi2


def test_gumbel_softmax_of_bfloat16_logits_is_float32():
    """bf16 logits (autocast) are sampled in float32: the same draw as from the float32 logits, bit for bit."""
    logits = (4 * torch.randn(4, 16, 3, 3)).bfloat16()
    torch.manual_seed(0)
    with torch.autocast("cpu", torch.bfloat16):
        out = gumbel_softmax(logits, tau=1 / 16)
    torch.manual_seed(0)
    expected = gumbel_softmax(logits.float(), tau=1 / 16)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------
# KL to the uniform prior


def test_kl_to_uniform_matches_log_k_minus_entropy():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 7, 4, 5)
    kl = kl_to_uniform(logits)
    assert kl.shape == (3, 4, 5)
    expected = np_kl_to_uniform(logits.numpy(), axis=1)
    np.testing.assert_allclose(kl.numpy(), expected, atol=1e-5, rtol=1e-5)
    assert (kl >= -1e-6).all()
    assert kl.max() > 0.1  # not trivially zero
    # another dim, and a peaked distribution: KL -> log K as q -> one-hot
    flat = torch.randn(6, 11)
    np.testing.assert_allclose(kl_to_uniform(flat, dim=-1).numpy(), np_kl_to_uniform(flat.numpy(), axis=-1),
                               atol=1e-5, rtol=1e-5)
    peaked = torch.zeros(1, 9)
    peaked[0, 4] = 60.0
    assert abs(kl_to_uniform(peaked, dim=1).item() - math.log(9)) < 1e-5


def test_kl_to_uniform_is_zero_for_uniform_logits():
    logits = torch.full((2, 16, 3, 3), 3.7)
    assert kl_to_uniform(logits).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------
# logit-Laplace likelihood (App. A.3)


@pytest.mark.parametrize("mu, log_b", [(0.0, 0.0), (1.3, math.log(0.3)), (-0.8, math.log(2.0)),
                                       (0.4, math.log(0.05))])
def test_logit_laplace_density_integrates_to_one(mu, log_b):
    """∫_0^1 exp(−nll(x)) dx = 1, by the trapezoid rule over u = logit(x) (dx = x(1 − x) du), float64."""
    b = math.exp(log_b)
    lo, hi = max(mu - 40 * b, -30.0), min(mu + 40 * b, 30.0)     # beyond ±30, sigmoid saturates in float64
    u = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    x = torch.sigmoid(u)
    nll = logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, log_b))
    integrand = torch.exp(-nll) * x * (1 - x)
    total = torch.trapezoid(integrand, u).item()
    tail = 0.5 * (math.exp(-(mu - lo) / b) + math.exp(-(hi - mu) / b))  # Laplace mass outside [lo, hi]
    assert abs(total + tail - 1) < 1e-3, total


@pytest.mark.parametrize("mu, log_b", [(0.0, math.log(0.5)), (0.7, math.log(0.25))])
def test_logit_laplace_density_integrates_to_one_in_x(mu, log_b):
    """The same on a plain midpoint grid in x (no change of variables): for b < 1 the density is bounded."""
    n = 200_000
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    nll = logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, log_b))
    assert abs(torch.exp(-nll).mean().item() - 1) < 1e-3


def test_logit_laplace_nll_closed_form_values():
    # at x = sigmoid(μ): −log f = log(2b) + log(x(1 − x)); one b away in logit space adds exactly 1
    mu, b = 0.5, 0.8
    x0 = torch.sigmoid(torch.tensor(mu, dtype=torch.float64))
    x1 = torch.sigmoid(torch.tensor(mu + b, dtype=torch.float64))
    lb = torch.tensor(math.log(b), dtype=torch.float64)
    nll0 = logit_laplace_nll(x0, torch.tensor(mu, dtype=torch.float64), lb).item()
    nll1 = logit_laplace_nll(x1, torch.tensor(mu, dtype=torch.float64), lb).item()
    assert abs(nll0 - (math.log(2 * b) + math.log(x0 * (1 - x0)))) < 1e-12
    assert abs(nll1 - (1 + math.log(2 * b) + math.log(x1 * (1 - x1)))) < 1e-12


def test_map_unmap_pixels():
    x = torch.linspace(-1, 1, 1001)
    m = map_pixels(x)
    assert torch.allclose(m[[0, 500, -1]], torch.tensor([0.1, 0.5, 0.9]), atol=1e-7)
    assert m.min() >= 0.1 - 1e-7 and m.max() <= 0.9 + 1e-7
    assert (m[1:] > m[:-1]).all()  # increasing, affine
    assert torch.allclose(m, 0.8 * (x + 1) / 2 + 0.1, atol=1e-7)
    assert torch.allclose(unmap_pixels(m), x, atol=1e-6)
    # unmap clamps what lies outside [ε, 1 − ε] (e.g. a sigmoid output of 0.01 or 0.99)
    assert torch.equal(unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])), torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_cosine_schedule():
    assert cosine(0, 1.0, 1 / 16, 100) == 1.0
    assert abs(cosine(100, 1.0, 1 / 16, 100) - 1 / 16) < 1e-12
    assert abs(cosine(50, 0.0, 6.6, 100) - 3.3) < 1e-12
    assert cosine(10**6, 0.0, 6.6, 100) == 6.6  # flat afterwards
    vals = [cosine(s, 1.0, 0.0, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------------------------------
# the full-size dry run


_RSS_WRAPPER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("MAXRSS_BYTES", rss if sys.platform == "darwin" else rss * 1024)
sys.exit(r.returncode)
"""


def test_full_dry_run_param_count_allocates_nothing():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def peak_rss(*command):  # a wrapper without torch runs the command, so RUSAGE_CHILDREN sees only that one
        r = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, sys.executable, *command], cwd=ROOT,
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return r, int(re.search(r"^MAXRSS_BYTES (\d+)", r.stdout, re.M).group(1))

    r, rss = peak_rss("train_dvae.py", "--size", "full", "--dry-run")
    out = r.stdout
    total = int(re.search(r"^total: ([\d,]+) parameters \(([\d.]+)M\)", out, re.M).group(1).replace(",", ""))
    parts = {name: float(n) * 1e6 for name, n in re.findall(r"^\s+(\w+)\s+([\d.]+)M parameters", out, re.M)}
    # DESIGN.md: about 53.8M + 43.8M parameters (counted from openai/DALL-E's released code)
    assert abs(total - 97.6e6) / 97.6e6 < 0.02, total
    assert abs(parts["encoder"] - 53.8e6) / 53.8e6 < 0.02, parts
    assert abs(parts["decoder"] - 43.8e6) / 43.8e6 < 0.02, parts
    assert abs(parts["encoder"] + parts["decoder"] - total) < 0.02e6  # the parts add up (2-decimal rounding)
    # the printed config is the full preset
    cfg = json.loads(out[out.index("{"):out.index("}") + 1])
    assert cfg == dataclasses.asdict(DVAEConfig(**PRESETS["full"]))
    # allocates nothing: 97.6M float32 weights would add 390 MB to the same imports alone (whose size depends on
    # the torch build: ~300 MB for a CPU build, ~700 MB with CUDA's libraries)
    _, imports_only = peak_rss("-c", "import train_dvae")
    assert rss - imports_only < 390e6 / 2, f"dry run peaked at {rss / 1e6:.0f} MB, imports at {imports_only / 1e6:.0f}"


# ----------------------------------------------------------------------------------------------------
# the model


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return DVAE(DVAEConfig(image_size=32, group_count=3, **{**TINY, **kw}))


def test_preset_grid_sizes():
    assert DVAEConfig(**PRESETS["toy"]).grid_size == 16     # 32 px -> 16×16
    assert DVAEConfig(**PRESETS["small"]).grid_size == 16   # 128 px -> 16×16
    assert DVAEConfig(**PRESETS["full"]).grid_size == 32    # 256 px -> 32×32 (DALL-E)
    assert DVAEConfig(image_size=16, group_count=2).grid_size == 8


@pytest.mark.parametrize("recon", ["mse", "logit_laplace"])
def test_encode_decode_shapes_and_ranges(recon):
    model = tiny_model(recon=recon).eval()
    K = model.cfg.vocab_size
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, model.cfg.grid_size, model.cfg.grid_size) == (3, 8, 8)  # 32 px, 3 groups
    assert codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < K
    # encode is the argmax of the encoder's logits: no Gumbel noise, the same under any RNG state
    with torch.no_grad():
        logits = model.encoder(x)
    assert logits.shape == (3, K, 8, 8)
    torch.manual_seed(99)
    assert torch.equal(model.encode(x), logits.argmax(1))
    # decode: one-hot codes through the decoder, then the output mapping (written out by hand)
    codes = torch.randint(0, K, (3, 8, 8))
    images = model.decode(codes)
    assert images.shape == (3, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    z = torch.zeros(3, K, 8, 8).scatter_(1, codes[:, None], 1.0)
    with torch.no_grad():
        mu = model.decoder(z)[:, :3]
    expected = mu.clamp(-1, 1) if recon == "mse" else ((torch.sigmoid(mu) - 0.1) / 0.8 * 2 - 1).clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-6)
    assert images.std() > 0


@pytest.mark.parametrize("recon", ["mse", "logit_laplace"])
def test_forward_loss_and_kl_term(recon):
    model = tiny_model(recon=recon).double()
    C, H, W = 3, 32, 32
    torch.manual_seed(2)
    x = torch.rand(2, C, H, W, dtype=torch.float64) * 2 - 1
    tau, beta = 0.7, 50.0

    torch.manual_seed(7)
    loss0, recon0 = model(x, tau, 0.0)
    torch.manual_seed(7)
    loss1, recon1 = model(x, tau, beta)
    assert loss0.dim() == 0 and loss1.dim() == 0
    assert recon0.shape == x.shape
    assert torch.equal(recon0, recon1)  # same noise, same relaxed codes

    # the KL part: β · mean over images of Σ_positions KL(q || uniform), divided by C·H·W (App. A.2)
    with torch.no_grad():
        logits = model.encoder(x)
    kl = np_kl_to_uniform(logits.numpy(), axis=1)                # (B, h, w)
    expected_kl_part = beta * kl.sum((1, 2)).mean() / (C * H * W)
    assert expected_kl_part > 1e-3
    assert abs((loss1 - loss0).item() - expected_kl_part) < 1e-9 * max(1, expected_kl_part)

    # the reconstruction part, recomputed from the same relaxed sample
    with torch.no_grad():
        torch.manual_seed(7)
        z = gumbel_softmax(logits, tau)
        stats = model.decoder(z)
    mu, log_b = stats[:, :C].numpy(), stats[:, C:].numpy()
    xn = x.numpy()
    if recon == "mse":
        expected_recon = ((mu - xn) ** 2).mean()
    else:
        xm = 0.8 * (xn + 1) / 2 + 0.1
        lx = np.log(xm / (1 - xm))
        expected_recon = (np.abs(lx - mu) / np.exp(log_b) + np.log(2) + log_b + np.log(xm * (1 - xm))).mean()
    assert abs(loss0.item() - expected_recon) < 1e-9

    # gradients reach both halves of the model
    loss1.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.decoder.net[0].weight.grad.abs().sum() > 0


def test_diversity_term_is_kl_of_mean_code_probabilities():
    """diversity_weight w adds w · (log K − H(p̄)), p̄ = softmax(logits) averaged over batch and positions."""
    model = tiny_model().double()
    torch.manual_seed(3)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    torch.manual_seed(11)
    loss0, _ = model(x, 0.5, 0.0)
    model.cfg.diversity_weight = 0.25
    torch.manual_seed(11)
    loss1, _ = model(x, 0.5, 0.0)
    with torch.no_grad():
        logits = model.encoder(x).numpy()                          # (B, K, h, w)
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    p_bar = q.mean((0, 2, 3))                                      # (K,)
    expected = 0.25 * (math.log(len(p_bar)) + (p_bar * np.log(p_bar)).sum())
    assert expected > 0
    assert abs((loss1 - loss0).item() - expected) < 1e-9


def test_forward_hard_uses_one_hot_codes():
    model = tiny_model(hard=True).double()
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    torch.manual_seed(4)
    loss, recon = model(x, 1.0, 0.0)
    with torch.no_grad():
        torch.manual_seed(4)
        z = gumbel_softmax(model.encoder(x), 1.0, hard=True)
        assert ((z == 0) | (z == 1)).all()
        mu = model.decoder(z)[:, :3]
    assert abs(loss.item() - F.mse_loss(mu, x).item()) < 1e-12
    assert torch.allclose(recon, mu.clamp(-1, 1))


def test_residual_gain_and_module_layout():
    # App. A: residual branch scaled by 1 / n_layers², n_layers = group_count · n_blk_per_group
    model = tiny_model()
    blocks = [m for m in model.modules() if isinstance(m, dvae.EncoderBlock)]
    assert len(blocks) == 2 * 3 * 2  # encoder + decoder, 3 groups × 2 blocks
    assert all(b.post_gain == 1 / 36 for b in blocks)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.encoder.modules()) == 2
    assert sum(isinstance(m, torch.nn.Upsample) for m in model.decoder.modules()) == 2
    assert model.decoder.net[-1].out_channels == 6  # μ and ln b per channel
