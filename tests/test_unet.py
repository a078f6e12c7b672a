"""Tests for nanodalle/unet.py: output shapes of the toy decoder and upsampler, the exactly-zero output at
initialisation and gradients reaching every parameter, the timestep embedding against an independent numpy
sinusoid, conditioning that matters and classifier-free-guidance dropping that removes it exactly, caption
padding that changes nothing, and the full presets' parameter counts on the meta device. Toy sizes at
batch 2 on one thread: a few seconds on a 2-core CPU.
"""
import resource

import numpy as np
import pytest
import torch

from nanodalle.diffusion import timestep_embedding
from nanodalle.unet import PRESETS, UNet, UNetConfig

B = 2




def toy(name="toy", **over) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**PRESETS[name], **over}))


def captions(cfg: UNetConfig, lengths, T=None, seed=0) -> torch.Tensor:
    """(len(lengths), T) random captions of the given real lengths (the last real token is the eot),
    padded with pad_id, as Tokenizer.encode_batch makes them."""
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.text_len
    tokens = torch.full((len(lengths), T), cfg.pad_id)
    for row, n in enumerate(lengths):
        tokens[row, :n - 1] = torch.randint(0, cfg.pad_id - 1, (n - 1,), generator=g)
        tokens[row, n - 1] = cfg.pad_id - 1  # the eot id (pad_id - 1 with nanodalle's tokenizer)
    return tokens


def decoder_inputs(cfg: UNetConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([3, 871])
    clip_emb = torch.randn(B, cfg.clip_dim, generator=g)
    return x, t, clip_emb, captions(cfg, [7, 12], seed=seed)


def randomize_zero_layers(model: UNet, std=0.05):
    """Give the zero-initialised layers (and null embeddings) random values, so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, std)


def test_output_shape_equals_input_shape():
    model = toy()
    x, t, clip_emb, tokens = decoder_inputs(model.cfg)
    assert model(x, t, clip_emb=clip_emb, tokens=tokens).shape == x.shape == (B, 3, 32, 32)

    up = toy("toy_upsampler")
    x, low = torch.randn(B, 3, 64, 64), torch.randn(B, 3, 32, 32)
    assert up(x, t, low_res=low).shape == x.shape
    # fully convolutional: the same upsampler runs on 32×32 training crops (16×16 low-res crops)
    assert up(x[:, :, :32, :32], t, low_res=low[:, :, :16, :16]).shape == (B, 3, 32, 32)

    with pytest.raises(ValueError, match="needs clip_emb"):
        model(x[:, :, :32, :32], t, tokens=tokens)
    with pytest.raises(ValueError, match="takes no clip_emb"):
        up(x, t, clip_emb=clip_emb, low_res=low)
    with pytest.raises(ValueError, match="text_len"):
        model(x[:, :, :32, :32], t, clip_emb=clip_emb, tokens=captions(model.cfg, [5, 5], T=model.cfg.text_len + 1))


def test_zero_output_at_init_and_gradients_reach_every_parameter():
    model = toy(dropout=0.1)
    x, t, clip_emb, tokens = decoder_inputs(model.cfg)
    out = model(x, t, clip_emb=clip_emb, tokens=tokens)
    assert torch.equal(out, torch.zeros_like(out)), "the output conv is zero-initialised: ε̂ = 0 at init"
    res_block, attn_block = model.middle[0], model.middle[1]  # every residual branch starts as the identity
    h, emb = torch.randn(B, 128, 8, 8), torch.randn(B, 128)
    assert torch.equal(res_block(h, emb), h) and torch.equal(attn_block(h, torch.randn(B, 24, 64)), h)

    # Without drop_clip, null_clip is legitimately unused; every other parameter is in the graph. (null_text
    # is in it through a per-sample torch.where, but no caption here is empty, so its gradient is 0.)
    target = torch.randn_like(x)
    ((out - target) ** 2).mean().backward()
    names = {n for n, _ in model.named_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names - {"null_clip"}
    assert torch.equal(model.null_text.grad, torch.zeros_like(model.null_text))

    # With one sample of each dropped, everything is used. Zero-init means the signal needs a few steps to reach
    # the deepest parameters (step 1 moves the output conv, step 2 the residual outputs, step 3 the rest):
    # after the third backward, every parameter has a non-zero gradient.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    drop_clip, drop_text = torch.tensor([True, False]), torch.tensor([False, True])
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        out = model(x, t, clip_emb=clip_emb, tokens=tokens, drop_clip=drop_clip, drop_text=drop_text)
        ((out - target) ** 2).mean().backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_timestep_embedding_matches_numpy_sinusoid():
    t = torch.tensor([0, 1, 37, 500, 999])
    dim = 32
    got = timestep_embedding(t, dim).numpy()
    half = dim // 2
    freqs = 10000.0 ** (-np.arange(half) / half)  # ω_i = 10000^(−i/half), in float64
    args = t.numpy()[:, None].astype(np.float64) * freqs[None, :]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    assert got.shape == (5, dim)
    np.testing.assert_allclose(got, want, atol=2e-4)  # float32 arguments up to 999 rad
    assert np.all(got[0, :half] == 1) and np.all(got[0, half:] == 0)  # t = 0: cos 0, sin 0


def test_conditioning_matters_and_dropping_removes_it():
    model = toy()
    randomize_zero_layers(model)
    cfg = model.cfg
    x, t, clip_a, tokens_a = decoder_inputs(cfg, seed=0)
    _, _, clip_b, tokens_b = decoder_inputs(cfg, seed=1)
    with torch.no_grad():
        def run(**kw):
            return model(x, t, **{"clip_emb": clip_a, "tokens": tokens_a, **kw})

        base = run()
        per_sample = lambda a, b: (a - b).flatten(1).abs().amax(dim=1)  # (B,) largest change of each sample
        assert (per_sample(run(clip_emb=clip_b), base) > 1e-3).all(), "z_i must change the output"
        assert (per_sample(run(tokens=tokens_b), base) > 1e-3).all(), "the caption must change the output"

        # drop_clip: sample 0's output no longer depends on z_i at all; sample 1's still does
        drop = torch.tensor([True, False])
        a, b = run(clip_emb=clip_a, drop_clip=drop), run(clip_emb=clip_b, drop_clip=drop)
        assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-3)
        # ...and a dropped z_i is exactly the learned null embedding (which lives after the √D scaling of z_i)
        null = torch.stack([model.null_clip / cfg.clip_dim ** 0.5, clip_a[1]])
        torch.testing.assert_close(a, run(clip_emb=null), rtol=0, atol=1e-5)

        # drop_text: the same for the caption; a dropped caption is exactly an all-pad caption
        a, b = run(tokens=tokens_a, drop_text=drop), run(tokens=tokens_b, drop_text=drop)
        assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-3)
        all_pad = tokens_a.clone()
        all_pad[0] = cfg.pad_id
        torch.testing.assert_close(a, run(tokens=all_pad), rtol=0, atol=1e-6)

    up = toy("toy_upsampler")
    randomize_zero_layers(up)
    x, low = torch.randn(B, 3, 64, 64), torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(up(x, t, low_res=low), up(x, t, low_res=low + 0.5), atol=1e-3)


def test_caption_padding_changes_nothing():
    model = toy()
    randomize_zero_layers(model)
    cfg = model.cfg
    x, t, clip_emb, _ = decoder_inputs(cfg)
    with torch.no_grad():
        padded = model(x, t, clip_emb=clip_emb, tokens=captions(cfg, [5, 9], T=cfg.text_len))  # 11 and 15 pads
        short = model(x, t, clip_emb=clip_emb, tokens=captions(cfg, [5, 9], T=9))  # 4 and 0 pads
        alone = model(x[:1], t[:1], clip_emb=clip_emb[:1], tokens=captions(cfg, [5], T=5))  # no pad at all
        assert not torch.allclose(padded[0], padded[1], atol=1e-3)
    torch.testing.assert_close(padded, short, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[:1], alone, rtol=0, atol=1e-5)


# documented in unet.py's PRESETS comment: (low, high) bounds in parameters
EXPECTED_PARAMS = {
    "toy": (2e6, 6e6), "toy_upsampler": (1.5e6, 5e6), "small": (100e6, 200e6), "small_upsampler": (70e6, 95e6),
    "full": (3.0e9, 3.6e9),             # unCLIP decoder: 3.5B with its text encoder
    "full_upsampler": (600e6, 750e6),   # unCLIP 64 -> 256: 700M
    "full_upsampler2": (230e6, 330e6),  # unCLIP 256 -> 1024: 300M
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_on_meta(name):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set, KiB on Linux
    with torch.device("meta"):
        model = UNet(UNetConfig(**PRESETS[name]))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n:,} parameters ({n / 1e6:.1f}M)")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # < 200 MiB: no weights
    low, high = EXPECTED_PARAMS[name]
    assert low <= n <= high, f"{name}: {n:,} parameters, expected {low:,.0f}..{high:,.0f}"
