"""The unCLIP diffusion prior (nanodalle/prior.py) and train_prior.py end to end, on tiny models (CPU, seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanodalle import checkpoint, train_utils
from nanodalle.diffusion import guided
from nanodalle.prior import PRESETS, DiffusionPrior, PriorConfig, select_best

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
    ENV.pop(_k, None)
B, D, L, W = 3, 16, 6, 8
CLIP_FLAGS = ["--image-size", "16", "--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2",
              "--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--embed-dim", "16", "--batch-size", "8"]
PRIOR_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--max-images", "64",
               "--sample-steps", "8", "--log-every", "1"]


def tiny_prior(seed=0, **kw) -> DiffusionPrior:
    """A 2-layer prior with every parameter random (the zero-initialised head would hide bugs)."""
    torch.manual_seed(seed)
    cfg = PriorConfig(embed_dim=D, text_len=L, text_width=W, n_layer=2, n_head=2, n_embd=32, timesteps=50,
                      sample_steps=6, **kw)
    model = DiffusionPrior(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def conditioning(seed=1, lengths=(3, 6, 1)):
    g = torch.Generator().manual_seed(seed)
    text_emb = F.normalize(torch.randn(B, D, generator=g), dim=-1)  # (B, D) unit
    feats = torch.randn(B, L, W, generator=g)  # (B, L, W)
    pad_mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    return text_emb, feats, pad_mask


def test_clip_text_features_come_with_the_embedding():
    from nanodalle.clip import CLIP, CLIPConfig
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(text_width=32, text_layers=1, text_heads=2, embed_dim=16)).eval()
    tokens = torch.randint(0, 4096, (2, 20))
    tokens[:, 5] = clip.cfg.eot_id
    emb, feats = clip.encode_text_with_tokens(tokens)
    assert torch.equal(emb, clip.encode_text(tokens)) and feats.shape == (2, 20, 32)


def test_select_best_keeps_the_higher_dot_product():
    text = torch.eye(4)[:2]  # caption 0 points along e0, caption 1 along e1
    cands = torch.stack([torch.stack([torch.eye(4)[1], torch.eye(4)[0]]),     # caption 0: the 2nd wins
                         torch.stack([torch.eye(4)[1], -torch.eye(4)[1]])])   # caption 1: the 1st wins
    assert torch.equal(select_best(cands, text), torch.stack([torch.eye(4)[0], torch.eye(4)[1]]))


def test_sample_draws_two_and_keeps_the_one_closer_to_the_text(monkeypatch):
    model = tiny_prior()
    text_emb, feats, pad_mask = conditioning()
    # the sampler's (B·2, D) output, caption b's candidates in rows 2b, 2b+1: make the winner known
    winners = torch.tensor([1, 0, 1])
    good = text_emb * 3 + 0.1 * torch.randn(B, D)  # nearly z_t (any length: sample renormalises)
    bad = -text_emb + 0.1 * torch.randn(B, D)
    fake = torch.empty(B, 2, D)
    fake[torch.arange(B), winners], fake[torch.arange(B), 1 - winners] = good, bad
    calls = []

    def fake_ddim(model_fn, shape, steps, **kw):
        calls.append((tuple(shape), steps))
        return fake.view(B * 2, D)
    monkeypatch.setattr(model.diffusion, "ddim_sample", fake_ddim)
    out = model.sample(text_emb, feats, pad_mask, steps=5, n_candidates=2)
    assert calls == [((B * 2, D), 5)]
    assert torch.allclose(out, F.normalize(good, dim=-1))


def test_loss_is_the_mse_to_the_scaled_clean_embedding():
    model = tiny_prior()
    text_emb, feats, pad_mask = conditioning()
    image_emb = F.normalize(torch.randn(B, D), dim=-1)
    t, noise = torch.tensor([0, 17, 49]), torch.randn(B, D)
    loss = model(image_emb, text_emb, feats, pad_mask, t=t, noise=noise)  # eval mode: nothing dropped
    # independently: x0 = √D · z_i (unit-norm CLIP vectors have variance 1/D per coordinate), x_t by DDPM eq. 4
    x0 = image_emb * D ** 0.5
    abar = model.diffusion.alphas_cumprod[t][:, None]  # (B, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    pred = model.denoise(x_t, t, text_emb, feats, pad_mask)
    assert torch.allclose(loss, ((pred - x0) ** 2).mean(), rtol=1e-5)
    assert x0.var().item() == pytest.approx(1.0, abs=0.5)  # the scale the N(0, I) noise has
    # in training mode, a caption is dropped 10% of the time (unCLIP §2.2): loss = that of the dropped rows
    model.train()
    torch.manual_seed(3)
    drop = torch.rand(B) < model.cfg.cond_drop
    torch.manual_seed(3)
    assert torch.allclose(model(image_emb, text_emb, feats, pad_mask, t=t, noise=noise),
                          model(image_emb, text_emb, feats, pad_mask, t=t, noise=noise, drop=drop))


def test_causal_order_and_what_the_output_reads():
    model = tiny_prior()
    text_emb, feats, pad_mask = conditioning()
    x_t, t = torch.randn(B, D), torch.tensor([5, 20, 40])

    def hidden(x_t, t, text_emb=text_emb, feats=feats):
        prefix, mask = model.embed_prefix(text_emb, feats, pad_mask)
        x = torch.cat([prefix, model.embed_suffix(x_t, t)], dim=1)  # (B, L+4, C)
        return model.transformer(x, causal=True, key_padding_mask=F.pad(mask, (0, 3), value=True))
    h, h2 = hidden(x_t, t), hidden(torch.randn(B, D), t)
    noised = L + 2  # the noised image embedding's position: [caption, z_t, t, z_i^(t), query]
    assert torch.equal(h[:, :noised], h2[:, :noised])  # nothing before it sees it
    assert not torch.allclose(h[:, noised:], h2[:, noised:])
    # the prediction (at the final query) depends on every input: t, z_t, the real caption tokens...
    out = model.denoise(x_t, t, text_emb, feats, pad_mask)
    assert not torch.allclose(out, model.denoise(x_t, t + 1, text_emb, feats, pad_mask))
    assert not torch.allclose(out, model.denoise(x_t, t, text_emb.roll(1, 0), feats, pad_mask))
    real = feats.clone()
    real[0, 0] += 1
    assert not torch.allclose(out[0], model.denoise(x_t, t, text_emb, real, pad_mask)[0])
    # ...but not on the padding after the eot, which may also be cut off
    padded = feats.clone()
    padded[~pad_mask] = 100.0
    assert torch.allclose(out, model.denoise(x_t, t, text_emb, padded, pad_mask), atol=1e-6)
    cut = model.denoise(x_t, t, text_emb, feats[:, :4], pad_mask[:, :4])  # caption 1 (6 tokens) loses 2: skip it
    assert torch.allclose(out[[0, 2]], cut[[0, 2]], atol=1e-6)


def test_dropped_captions_make_the_prediction_caption_blind():
    model = tiny_prior()
    x_t, t = torch.randn(B, D), torch.tensor([5, 20, 40])
    drop = torch.ones(B, dtype=torch.bool)
    a = model.denoise(x_t, t, *conditioning(seed=1), drop=drop)
    b = model.denoise(x_t, t, *conditioning(seed=2, lengths=(6, 2, 4)), drop=drop)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, model.denoise(x_t, t, *conditioning(seed=1)))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cached_guided_sampling_equals_the_plain_model(scale):
    model = tiny_prior()
    text_emb, feats, pad_mask = conditioning()

    def cond(x, t):
        return model.denoise(x, t, text_emb, feats, pad_mask)

    def uncond(x, t):
        return model.denoise(x, t, text_emb, feats, pad_mask, drop=torch.ones(B, dtype=torch.bool))
    fn = model.cached_model_fn(text_emb, feats, pad_mask, scale)  # the prefix through a KV cache, once
    for x_t, t in ((torch.randn(B, D), torch.tensor([3, 10, 40])), (torch.randn(B, D), torch.tensor([49, 0, 7]))):
        assert torch.allclose(fn(x_t, t), guided(cond, uncond, scale)(x_t, t), atol=1e-5)
    if scale == 1:  # guidance scale 1 is the conditional model: sample == DDIM on it, then normalised
        noise = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
        out = model.sample(text_emb, feats, pad_mask, n_candidates=1, generator=torch.Generator().manual_seed(0),
                           guidance_scale=1.0)
        ref = model.diffusion.ddim_sample(cond, (B, D), model.cfg.sample_steps, noise=noise)
        assert torch.allclose(out, F.normalize(ref, dim=-1), atol=1e-5)


def test_sample_returns_unit_embeddings_reproducibly():
    model = tiny_prior(guidance_scale=2.0)
    cond = conditioning()
    a = model.sample(*cond, generator=torch.Generator().manual_seed(4))
    b = model.sample(*cond, generator=torch.Generator().manual_seed(4))
    assert a.shape == (B, D) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(B), atol=1e-5)


def test_full_preset_is_about_one_billion_parameters():
    with torch.device("meta"):
        model = DiffusionPrior(PriorConfig(**PRESETS["full"]))
    n = train_utils.count_params(model)
    # unCLIP App. C: "1B". 24 blocks of 12·2048² = 1.21B, plus 17M of projections: within 1.0B-1.3B
    assert 1.0e9 <= n <= 1.3e9, n


def test_the_prior_learns_a_text_to_image_map():
    """On synthetic pairs z_i = normalize(R z_t) (R fixed), a short training run must sample closer to the
    true z_i than z_t itself is."""
    torch.manual_seed(0)
    cfg = PriorConfig(embed_dim=D, text_len=4, text_width=W, n_layer=2, n_head=2, n_embd=64, timesteps=100,
                      sample_steps=10, cond_drop=0.1)
    model = DiffusionPrior(cfg)
    R = torch.linalg.qr(torch.randn(D, D))[0]
    feats, pad_mask = torch.zeros(64, 4, W), torch.ones(64, 4, dtype=torch.bool)

    def pairs(n):
        z_t = F.normalize(torch.randn(n, D), dim=-1)
        return F.normalize(z_t @ R, dim=-1), z_t
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        z_i, z_t = pairs(64)
        loss = model(z_i, z_t, feats, pad_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    z_i, z_t = pairs(64)
    sampled = model.sample(z_t, feats, pad_mask, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(sampled, z_i).mean().item()
    assert cos > 0.5 and cos > F.cosine_similarity(z_t, z_i).mean().item() + 0.3, cos


# ----------------------------------------------------------------------------------------------------
# train_prior.py end to end

def run(script, *flags, timeout=300):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step CLIP (embedding 16, text width 32, 20 tokens), then a 3-step prior on its embeddings."""
    tmp = tmp_path_factory.mktemp("prior")
    r = run("train_clip.py", *CLIP_FLAGS, "--steps", "2", "--out", str(tmp / "clip"))
    assert r.returncode == 0, r.stderr
    r = run("train_prior.py", *PRIOR_FLAGS, "--steps", "3", "--clip", str(tmp / "clip/ckpt.pt"),
            "--out", str(tmp / "prior"))
    return tmp, r


def test_train_prior_end_to_end(trained):
    tmp, r = trained
    assert r.returncode == 0, r.stderr
    out = tmp / "prior"
    for name in ("ckpt.pt", "log.jsonl", "metrics.json", "embeddings_train.pt", "embeddings_val.pt"):
        assert (out / name).is_file(), name
    assert "set from CLIP: embed_dim 128 -> 16, text_width 64 -> 32" in r.stdout
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "prior")
    cfg = PriorConfig(**ckpt["config"])
    assert (cfg.embed_dim, cfg.text_len, cfg.text_width) == (16, 20, 32)
    assert ckpt["upstream"]["clip_hash"] and ckpt["upstream"]["clip_config"]["embed_dim"] == 16
    assert "tokenizer" in ckpt
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_mse", "prior_cosine_to_true", "text_cosine_to_true", "mean_cosine_to_true"):
        assert -1 <= metrics[key] < float("inf"), key
    cache = torch.load(out / "embeddings_train.pt", weights_only=True)
    assert cache["image_emb"].shape == (64, 16) and cache["token_feats"].shape == (64, 20, 32)
    assert torch.allclose(cache["image_emb"].norm(dim=-1), torch.ones(64), atol=1e-4)
    # the model in the checkpoint samples unit CLIP image embeddings
    model = checkpoint.model_from_checkpoint(ckpt, PriorConfig, DiffusionPrior)
    lengths = cache["lengths"][:2].long()
    mask = torch.arange(20)[None] < lengths[:, None]
    z = model.sample(cache["text_emb"][:2], cache["token_feats"][:2].float(), mask, steps=4)
    assert z.shape == (2, 16) and torch.allclose(z.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_embedding_cache_is_reused(trained, tmp_path):
    tmp, r = trained
    assert r.returncode == 0, r.stderr
    assert "encoded 64 train images" in r.stdout
    for name in ("embeddings_train.pt", "embeddings_val.pt"):
        (tmp_path / name).write_bytes((tmp / "prior" / name).read_bytes())
    r2 = run("train_prior.py", *PRIOR_FLAGS, "--steps", "1", "--clip", str(tmp / "clip/ckpt.pt"),
             "--out", str(tmp_path))
    assert r2.returncode == 0, r2.stderr
    assert "embeddings: 64 train images from" in r2.stdout and "encoded" not in r2.stdout
    # another data spec (fewer images) makes the cache stale
    (tmp_path / "x").mkdir()
    (tmp_path / "x/embeddings_train.pt").write_bytes((tmp_path / "embeddings_train.pt").read_bytes())
    r3 = run("train_prior.py", *PRIOR_FLAGS, "--max-images", "32", "--steps", "1", "--clip",
             str(tmp / "clip/ckpt.pt"), "--out", str(tmp_path / "x"))
    assert r3.returncode == 0, r3.stderr
    assert "another model or data set, encoding again" in r3.stdout and "encoded 32 train images" in r3.stdout


def test_train_prior_user_errors(trained, tmp_path):
    tmp, r = trained
    for clip, needle in (("/nonexistent/clip.pt", "/nonexistent/clip.pt"),
                         (str(tmp / "prior/ckpt.pt"), "'prior' checkpoint")):
        r = run("train_prior.py", *PRIOR_FLAGS, "--clip", clip, "--out", str(tmp_path / "y"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    r = run("train_prior.py", *PRIOR_FLAGS, "--schedule", "quadratic", "--out", str(tmp_path / "q"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "'quadratic'" in lines[0], r.stderr
    assert not (tmp_path / "q").exists()  # refused before anything was written
    r = run("train_prior.py", "--size", "full", "--dry-run")
    assert r.returncode == 0 and "total: 1,2" in r.stdout
