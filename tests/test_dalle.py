"""Tests of the DALL-E 1 transformer (nanodalle/dalle.py): masks, loss, sampling, the KV cache, the full size."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanodalle.dalle import (DALLE, DALLEConfig, PRESETS, drop_captions, image_mask, layer_kinds, sample_logits,
                             stream_mask)

L, V, PAD, G, K = 6, 50, 49, 4, 16  # a tiny stream: 6 caption tokens, a 4×4 grid of 16 codes


def tiny(attention="full", n_layer=4, **kw):
    cfg = DALLEConfig(text_len=L, text_vocab=V, pad_id=PAD, grid_size=G, image_vocab=K, n_layer=n_layer, n_head=2,
                      n_embd=32, attention=attention, conv_kernel=3, **kw)
    torch.manual_seed(0)
    return DALLE(cfg).double().eval()


def captions(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, V - 2, (B, L), generator=g)
    for b in range(B):  # different caption lengths: eot at position 2 + b % 3, pads after
        text[b, 2 + b % 3] = V - 2
        text[b, 3 + b % 3:] = PAD
    return text


def grid_codes(B=3, seed=1):
    return torch.randint(0, K, (B, G * G), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# masks: the paper's Figure 11 on a 4×4 grid (1 = may attend), written out by hand

ROW_4x4 = """
1000000000000000
1100000000000000
1110000000000000
1111000000000000
1111100000000000
0111110000000000
0011111000000000
0001111100000000
0000111110000000
0000011111000000
0000001111100000
0000000111110000
0000000011111000
0000000001111100
0000000000111110
0000000000011111"""
COLUMN_4x4 = """
1000000000000000
0100000000000000
0010000000000000
0001000000000000
1000100000000000
0100010000000000
0010001000000000
0001000100000000
1000100010000000
0100010001000000
0010001000100000
0001000100010000
1000100010001000
0100010001000100
0010001000100010
0001000100010001"""
CONV3_4x4 = """
1000000000000000
1100000000000000
0110000000000000
0011000000000000
1100100000000000
1110110000000000
0111011000000000
0011001100000000
0000110010000000
0000111011000000
0000011101100000
0000001100110000
0000000011001000
0000000011101100
0000000001110110
0000000000110011"""


def parse(table):
    return torch.tensor([[c == "1" for c in line] for line in table.split()], dtype=torch.bool)


@pytest.mark.parametrize("kind,table", [("row", ROW_4x4), ("column", COLUMN_4x4), ("conv", CONV3_4x4)])
def test_image_masks_match_hand_written_4x4(kind, table):
    assert torch.equal(image_mask(kind, 4, kernel=3), parse(table))


def test_stream_mask_text_is_causal_and_image_sees_all_text():
    cfg = tiny("sparse").cfg
    T = L + G * G
    for kind in ("row", "column", "conv"):
        m = stream_mask(kind, cfg)
        assert m.shape == (T, T)
        assert torch.equal(m[:L + 1, :L + 1], torch.ones(L + 1, L + 1, dtype=torch.bool).tril())  # text: causal
        assert not m[:L + 1, L + 1:].any()  # text never sees the image
        assert m[L + 1:, :L + 1].all()      # every image position sees bos and the whole caption
        assert not m.triu(1).any()          # nothing sees the future
        assert torch.equal(m[L + 1:, L + 1:], image_mask(kind, G, 3)[:-1, :-1])


def test_sparse_layer_schedule_follows_the_paper():
    cfg = DALLEConfig(n_layer=12, attention="sparse")
    # 1-based i: column when (i − 2) mod 4 == 0 -> i = 2, 6, 10; the last layer convolutional
    assert layer_kinds(cfg) == ["row", "column", "row", "row", "row", "column", "row", "row", "row", "column",
                                "row", "conv"]
    assert layer_kinds(DALLEConfig(n_layer=3)) == ["full"] * 3


# ----------------------------------------------------------------------------------------------------
# the stream, the heads and the loss

def test_unique_pad_per_position():
    model = tiny()
    text = captions()
    ids = model.unique_pads(text)
    for b in range(3):
        for j in range(L):
            assert ids[b, j] == (V + j if text[b, j] == PAD else text[b, j])


def test_loss_weighting_equals_independent_computation():
    model = tiny("sparse")
    text, codes = captions(), grid_codes()
    loss, text_loss, image_loss = model(text, codes)
    # independently: run the stream, take each position's log-probabilities and average per token type
    x = torch.cat([model.embed_text(text), model.embed_image(codes[:, :-1])], dim=1)
    h = model.transformer(x, mask=model.masks(), causal=True)  # (B, L + N, C)
    text_lp = F.log_softmax(h[:, :L] @ model.text_embedding.weight.t(), dim=-1)  # (B, L, V + L)
    image_lp = F.log_softmax(h[:, L:] @ model.image_embedding.weight.t(), dim=-1)  # (B, N, K)
    targets = torch.where(text == PAD, V + torch.arange(L), text)
    t_nll = -sum(text_lp[b, j, targets[b, j]] for b in range(3) for j in range(L)) / (3 * L)
    i_nll = -sum(image_lp[b, n, codes[b, n]] for b in range(3) for n in range(G * G)) / (3 * G * G)
    torch.testing.assert_close(text_loss, t_nll)
    torch.testing.assert_close(image_loss, i_nll)
    torch.testing.assert_close(loss, t_nll / 8 + 7 * i_nll / 8)


def test_text_and_image_positions_have_separate_vocabularies():
    model = tiny()
    h = torch.randn(2, 5, 32, dtype=torch.float64)
    text_logits, image_logits = model.heads(h, L - 2)  # positions L-2, L-1 (text) and L, L+1, L+2 (image)
    assert text_logits.shape == (2, 2, V + L) and image_logits.shape == (2, 3, K)
    # the image table cannot change what a text position predicts: causal, and text logits read the text table
    text, codes = captions(), grid_codes()
    before = text_logits_of(model, text, codes)
    with torch.no_grad():
        model.image_embedding.weight.mul_(100)
    assert torch.equal(text_logits_of(model, text, codes), before)
    # sampling only ever returns image codes, even when the text vocabulary is much larger
    assert ((model.generate(text) >= 0) & (model.generate(text) < K)).all()


def text_logits_of(model, text, codes):
    x = torch.cat([model.embed_text(text), model.embed_image(codes[:, :-1])], dim=1)
    return model.heads(model.transformer(x, causal=True), 0)[0]


# ----------------------------------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize("attention", ["full", "sparse"])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_and_uncached_generation_give_identical_codes(attention, cond_scale):
    model = tiny(attention)
    text = captions()
    out = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        out.append(model.generate(text, generator=g, use_cache=use_cache, cond_scale=cond_scale, top_k=10))
    assert out[0].shape == (3, G * G)
    assert torch.equal(out[0], out[1])
    g = torch.Generator().manual_seed(8)  # and a different seed gives different codes
    assert not torch.equal(model.generate(text, generator=g, cond_scale=cond_scale), out[0])


def test_cached_logits_equal_full_forward_logits():
    """Stronger than equal samples: the cached step's logits equal the whole-stream forward's."""
    model = tiny("sparse")
    text, codes = captions(), grid_codes()
    cache = model.transformer.new_cache(3, L + G * G)
    for n in range(G * G):
        cached = model.next_logits(text, codes[:, :n], cache)
        full = model.next_logits(text, codes[:, :n])
        torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


def test_image_prompt_completion_keeps_the_given_rows():
    model = tiny("sparse")
    text, codes = captions(), grid_codes()
    prompt = codes[:, :2 * G]  # the top two rows
    out = model.generate(text, prompt_codes=prompt, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, G * G) and torch.equal(out[:, :2 * G], prompt)


def test_generation_is_deterministic_under_a_seed():
    model = tiny()
    text = captions()
    a = model.generate(text, generator=torch.Generator().manual_seed(3), top_p=0.9, temperature=0.8)
    b = model.generate(text, generator=torch.Generator().manual_seed(3), top_p=0.9, temperature=0.8)
    assert torch.equal(a, b)


def test_generation_defaults_to_the_configs_temperature():
    model = tiny(temperature=0.5)
    text = captions()
    default = model.generate(text, generator=torch.Generator().manual_seed(4))
    half = model.generate(text, generator=torch.Generator().manual_seed(4), temperature=0.5)
    one = model.generate(text, generator=torch.Generator().manual_seed(4), temperature=1.0)
    assert torch.equal(default, half) and not torch.equal(default, one)


def test_sample_logits_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 20)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, temperature=0), best)
    assert torch.equal(sample_logits(logits, top_k=1), best)
    assert torch.equal(sample_logits(logits, top_p=1e-6), best)  # the nucleus of one token
    # top-k: only the k best ever come out
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=3, generator=g) for _ in range(200)], 1)  # (4, 200)
    top3 = logits.topk(3, dim=-1).indices
    assert all(set(draws[b].tolist()) <= set(top3[b].tolist()) for b in range(4))
    # top-p: the smallest set of ids whose probability reaches p
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    seen = {sample_logits(p.log(), top_p=0.75, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}
    # no filter: the frequencies follow softmax(logits / T) within sampling error
    g = torch.Generator().manual_seed(1)
    n = 20000
    draws = sample_logits(p.log().expand(n, -1), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert torch.allclose(freq, p[0].double(), atol=4 * math.sqrt(0.25 / n))


def test_drop_captions():
    text = captions(8)
    assert torch.equal(drop_captions(text, 0.0, PAD), text)
    assert (drop_captions(text, 1.0, PAD) == PAD).all()
    g = torch.Generator().manual_seed(0)
    dropped = (drop_captions(captions(2000), 0.1, PAD, generator=g) == PAD).all(dim=1).float().mean()
    assert abs(dropped - 0.1) < 0.03


# ----------------------------------------------------------------------------------------------------
# sizes

def test_full_preset_is_the_papers_12B():
    cfg = DALLEConfig(**PRESETS["full"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.text_len, cfg.grid_size, cfg.image_vocab) == \
        (64, 62, 3968, 256, 32, 8192)
    with torch.device("meta"):
        model = DALLE(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 12.0e9) / 12.0e9 < 0.02, n
    assert all(p.is_meta for p in model.parameters())
