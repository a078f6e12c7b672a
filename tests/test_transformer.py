"""Tests for nanodalle/transformer.py: the hand-written attention against numpy and against SDPA, masks
(causal, padding, static sparse, per layer, cross-attention), the KV cache against the full forward,
GPT-2 initialisation, and a 12B model built on the meta device.

Sizes are tiny (C=32, nh=4, T=12), float32, one thread: the whole file takes a few seconds on a CPU.
"""
import math
import time

import numpy as np
import pytest
import torch

from nanodalle import transformer
from nanodalle.transformer import MLP, Attention, Block, KVCache, Linear, Transformer, build_mask, init_weights, linear

B, T, C, NH = 3, 12, 32, 4
CTX_DIM, S_CTX = 24, 7




def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths, n, left=False):
    """(len(lengths), n) bool, True for the real tokens; padding at the end (or the start if left)."""
    pos = torch.arange(n)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return pos >= n - lengths if left else pos < lengths


def random_mask(t, s, seed=0, p=0.5, empty_rows=(2, 7)):
    m = torch.rand(t, s, generator=torch.Generator().manual_seed(seed)) < p
    m[list(empty_rows)] = False  # queries that may attend to nothing at all
    return m


def causal_holes_mask(t, seed=0):
    """Lower-triangular with random holes, diagonal kept: the shape of DALL-E's sparse causal masks."""
    m = torch.tril(torch.rand(t, t, generator=torch.Generator().manual_seed(seed)) < 0.6)
    return m | torch.eye(t, dtype=torch.bool)


# name -> keyword arguments for a self-attention forward over (B, T, C)
CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "padding": dict(key_padding_mask=lengths_mask([T, 5, 0], T)),  # the last row is all padding
    "static": dict(mask=random_mask(T, T)),
    "static_batched": dict(mask=torch.stack([random_mask(T, T, seed=s) for s in range(B)])[:, None]),
    "static_larger": dict(mask=random_mask(T + 5, T + 5)),  # cut to (T, T)
    # left padding + causal: the first queries of row 1 see only padding, so they attend to nothing
    "causal_padding": dict(causal=True, key_padding_mask=lengths_mask([T, 8, 3], T, left=True)),
    "all": dict(causal=True, mask=causal_holes_mask(T), key_padding_mask=lengths_mask([T, 8, 3], T, left=True)),
}


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_attention_paths_agree(name):
    attn = Attention(C, NH).eval()
    x = randn(B, T, C)
    y_sdpa = attn(x, **CASES[name], use_sdpa=True)
    y_manual = attn(x, **CASES[name], use_sdpa=False)
    assert torch.isfinite(y_sdpa).all() and torch.isfinite(y_manual).all()
    assert max_diff(y_sdpa, y_manual) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_transformer_paths_agree(name):
    model = Transformer(3, C, NH).eval()
    x = randn(B, T, C)
    y_sdpa = model(x, **CASES[name], use_sdpa=True)
    y_manual = model(x, **CASES[name], use_sdpa=False)
    assert torch.isfinite(y_sdpa).all() and torch.isfinite(y_manual).all()
    assert max_diff(y_sdpa, y_manual) <= 1e-5


def test_per_layer_masks():
    model = Transformer(3, C, NH).eval()
    x = randn(B, T, C)
    masks = [random_mask(T, T, seed=i, empty_rows=(i,)) for i in range(3)]
    y_sdpa, y_manual = model(x, mask=masks), model(x, mask=masks, use_sdpa=False)
    assert max_diff(y_sdpa, y_manual) <= 1e-5
    # a list really gives each layer its own mask: the same mask in every layer is something else
    assert max_diff(y_sdpa, model(x, mask=masks[0])) > 1e-3
    assert max_diff(model(x, mask=[masks[0]] * 3), model(x, mask=masks[0])) == 0
    with pytest.raises(ValueError):
        model(x, mask=masks[:2])


def test_cross_attention_paths_agree():
    x, ctx = randn(B, T, C), randn(B, S_CTX, CTX_DIM, seed=1)
    ctx_mask = lengths_mask([S_CTX, 3, 0], S_CTX)  # the last row has no context at all
    attn = Attention(C, NH, context_dim=CTX_DIM).eval()
    y = attn(x, context=ctx, key_padding_mask=ctx_mask)
    assert y.shape == (B, T, C)
    assert max_diff(y, attn(x, context=ctx, key_padding_mask=ctx_mask, use_sdpa=False)) <= 1e-5
    # no context: attention gives 0, so the output is the projection's bias
    assert torch.equal(y[2], attn.proj.bias.expand(T, C))
    model = Transformer(3, C, NH, context_dim=CTX_DIM).eval()
    kw = dict(causal=True, context=ctx, context_mask=ctx_mask)
    assert max_diff(model(x, **kw), model(x, **kw, use_sdpa=False)) <= 1e-5


def test_gradients_agree():
    model = Transformer(3, C, NH)
    case = CASES["all"]
    grads = []
    for use_sdpa in (True, False):
        x = randn(B, T, C).requires_grad_()
        model.zero_grad()
        model(x, **case, use_sdpa=use_sdpa).square().sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in model.parameters()])
    for g_sdpa, g_manual in zip(*grads):
        assert torch.isfinite(g_sdpa).all() and torch.isfinite(g_manual).all()
        assert max_diff(g_sdpa, g_manual) <= 1e-5


def test_manual_math_by_hand():
    """One head, identity projections: y = softmax(x·xᵀ/√C + causal mask) · x, computed with numpy."""
    attn = Attention(2, 1)
    for lin in (attn.query, attn.key, attn.value, attn.proj):
        torch.nn.init.eye_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = np.array([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]])
    scores = x @ x.T / np.sqrt(2)
    scores[np.triu_indices(3, k=1)] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = weights @ x
    xt = torch.tensor(x, dtype=torch.float32)[None]
    for use_sdpa in (False, True):
        y = attn(xt, causal=True, use_sdpa=use_sdpa)[0].detach().numpy()
        np.testing.assert_allclose(y, expected, atol=1e-6)
    assert np.allclose(expected[0], x[0])  # the first token sees only itself


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("kind", ["causal", "static"])
def test_causality(kind, use_sdpa):
    model = Transformer(3, C, NH).eval()
    kw = dict(causal=True) if kind == "causal" else dict(mask=causal_holes_mask(T))
    x = randn(B, T, C)
    y = model(x, **kw, use_sdpa=use_sdpa)
    for j in (0, 5, T - 1):
        x2 = x.clone()
        x2[:, j] = randn(B, C, seed=j + 1)
        y2 = model(x2, **kw, use_sdpa=use_sdpa)
        assert torch.equal(y2[:, :j], y[:, :j])  # the past never sees the future, exactly
        assert max_diff(y2[:, j], y[:, j]) > 1e-3


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_padding_is_ignored(use_sdpa):
    model = Transformer(3, C, NH).eval()
    pad = lengths_mask([T, 5, 9], T)
    x = randn(B, T, C)
    x2 = torch.where(pad[..., None], x, randn(B, T, C, seed=7))  # new values at the padded positions only
    y, y2 = model(x, key_padding_mask=pad, use_sdpa=use_sdpa), model(x2, key_padding_mask=pad, use_sdpa=use_sdpa)
    assert max_diff(y[pad], y2[pad]) <= 1e-6
    assert max_diff(y[~pad], y2[~pad]) > 1e-3


def test_mask_building():
    allowed = build_mask(3, 3, causal=True)
    assert torch.equal(allowed, torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    # with a cache at length 4: query rows are absolute positions 4 and 5, keys 0..5
    big = causal_holes_mask(8)
    assert torch.equal(build_mask(2, 6, start=4, mask=big), big[4:6, :6])
    assert build_mask(1, 6, start=5, causal=True) is None  # one cached step sees every key
    with pytest.raises(TypeError):
        build_mask(3, 3, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="absolute"):  # with a cache, a (T_new, S) mask is a mistake
        build_mask(1, 6, start=5, mask=big[:1, :6])
    with pytest.raises(ValueError, match="context"):
        Attention(C, NH, context_dim=CTX_DIM)(randn(B, T, C))


def decode(model, x, chunks, use_sdpa, **kw):
    """Run x (B, T, C) through the model with a KV cache, `chunks` tokens at a time; concatenate outputs."""
    cache = model.new_cache(x.size(0), max_len=x.size(1) + 2)
    ptr = cache.k[0].data_ptr()
    out, t = [], 0
    for n in chunks:
        out.append(model(x[:, t:t + n], cache=cache, use_sdpa=use_sdpa, **kw))
        t += n
    assert cache.length == t == x.size(1)
    assert cache.k[0].data_ptr() == ptr  # written in place, never reallocated
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("kind", ["causal", "static", "causal_left_padding"])
@pytest.mark.parametrize("chunks", ["one_by_one", "prompt_then_tokens", "mixed_chunks"])
def test_kv_cache_matches_full_forward(kind, use_sdpa, chunks):
    model = Transformer(3, C, NH).eval()
    x = randn(B, T, C)
    kw = {"causal": dict(causal=True), "static": dict(mask=causal_holes_mask(T)),
          "causal_left_padding": CASES["causal_padding"]}[kind]
    chunk_sizes = {"one_by_one": [1] * T, "prompt_then_tokens": [5] + [1] * (T - 5),
                   "mixed_chunks": [5, 1, 3, 1, 2]}[chunks]  # a chunk after the prompt: masks by absolute row
    with torch.no_grad():
        full = model(x, **kw, use_sdpa=use_sdpa)
        cached = decode(model, x, chunk_sizes, use_sdpa, **kw)
    assert max_diff(full, cached) <= 1e-5


def test_decoding_steps_follow_the_current_weights():
    """A decoding step reads q, k, v weights stacked once per cache: a new cache sees changed weights."""
    model = Transformer(2, C, NH).eval()
    x = randn(B, T, C)
    with torch.no_grad():
        decode(model, x, [1] * T, True, causal=True)
        assert len(model.new_cache(B, T).qkv_weights) == 0
        for block in model.blocks:  # as a training step would
            block.attn.key.weight.mul_(-2.0)
            block.attn.value.bias.add_(0.5)
        full = model(x, causal=True)
        cached = decode(model, x, [1] * T, True, causal=True)
    assert max_diff(full, cached) <= 1e-5


def test_kv_cache_cross_attention():
    model = Transformer(2, C, NH, context_dim=CTX_DIM).eval()
    x, ctx = randn(B, T, C), randn(B, S_CTX, CTX_DIM, seed=1)
    kw = dict(causal=True, context=ctx, context_mask=lengths_mask([S_CTX, 3, 1], S_CTX))
    with torch.no_grad():
        full = model(x, **kw)
        cache = model.new_cache(B, T)
        steps = [model(x[:, :4], cache=cache, **kw)]
        assert set(cache.context_kv) == {0, 1}  # the context's keys/values are computed once...
        kv = cache.context_kv[0][0]
        steps += [model(x[:, t:t + 1], cache=cache, **kw) for t in range(4, T)]
        assert cache.context_kv[0][0] is kv  # ...and reused
    assert max_diff(full, torch.cat(steps, dim=1)) <= 1e-5


def test_kv_cache_overflow():
    model = Transformer(1, C, NH).eval()
    cache = model.new_cache(1, max_len=4)
    assert isinstance(cache, KVCache) and cache.k[0].shape == (1, NH, 4, C // NH)
    model(randn(1, 4, C), causal=True, cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(randn(1, 1, C), causal=True, cache=cache)


def test_shapes_and_blocks():
    block = Block(C, NH, context_dim=CTX_DIM, mlp_ratio=2)
    assert block.mlp.fc.out_features == 2 * C
    y = block(randn(B, T, C), context=randn(B, S_CTX, CTX_DIM))
    assert y.shape == (B, T, C)
    assert MLP(C)(randn(B, T, C)).shape == (B, T, C)
    model = Transformer(2, C, NH, bias=False)
    assert all(p.dim() == 2 for p in model.parameters() if p.dim() != 1) and model.ln_f.bias is None
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_init():
    n_layer, width = 4, 256
    model = Transformer(n_layer, width, 8)
    residual = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            assert abs(proj.weight.std().item() - residual) < 0.1 * residual
            assert torch.all(proj.bias == 0)
        assert abs(block.attn.query.weight.std().item() - 0.02) < 0.002
        assert abs(block.mlp.fc.weight.std().item() - 0.02) < 0.002
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)
    emb = torch.nn.Embedding(1000, width)
    init_weights(emb, n_layer)
    assert abs(emb.weight.std().item() - 0.02) < 0.002


def test_dalle_size_on_meta_device():
    """DALL-E's 12B transformer (64 layers, 3968 wide, 62 heads) built on meta: no memory, right count."""
    n_layer, width, n_head = 64, 3968, 62
    t0 = time.time()
    with torch.device("meta"):
        model = Transformer(n_layer, width, n_head)
    assert time.time() - t0 < 5
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    # per block: q, k, v, out (4C² + 4C) + MLP (8C² + 5C) + two LayerNorms (4C); then the final LayerNorm
    expected = n_layer * (12 * width ** 2 + 13 * width) + 2 * width
    assert sum(p.numel() for p in params) == expected
    assert 12.0e9 < expected < 12.2e9
    with torch.device("meta"):
        cache = model.new_cache(2, 1280)
    assert cache.k[0].is_meta


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_autocast_bf16(use_sdpa):
    model = Transformer(2, C, NH).eval()
    x = randn(2, T, C)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, **CASES["all"] | dict(key_padding_mask=lengths_mask([T, 6], T, left=True)),
                  use_sdpa=use_sdpa)
        cache = model.new_cache(2, T, dtype=torch.bfloat16)
        steps = [model(x[:, t:t + 1], causal=True, cache=cache, use_sdpa=use_sdpa) for t in range(T)]
    full = model(x, causal=True)
    assert torch.isfinite(y).all()
    assert max_diff(torch.cat(steps, dim=1).float(), full) < 0.1


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 1, 48), (8, 1, 48), (1, 48), (3, 6, 48), (40, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_few_rows_path(shape, bias):
    """Linear's CPU path for ≤ 16 rows without grad (W @ xᵀ) equals nn.Linear's x @ Wᵀ + b, same shape,
    a contiguous result; with grad on, it is nn.Linear exactly and gradients flow."""
    torch.manual_seed(0)
    lin = Linear(48, 24, bias=bias)
    lin.as_gemm = True  # the W @ xᵀ path, whichever this CPU prefers
    ref = torch.nn.Linear(48, 24, bias=bias)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        fast, want = lin(x), ref(x)
    assert fast.shape == want.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-6)
    y = lin(x.requires_grad_())
    assert torch.equal(y, ref(x))
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("as_gemm", [True, False])
def test_linear_function_matches_f_linear(as_gemm):
    """transformer.linear (used by DALL-E's image head too) equals F.linear on few and many rows, no grad,
    whichever way a few rows are computed."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 48), torch.randn(24)
    for shape in [(1, 1, 48), (5, 48), (2, 40, 48), (2, 0, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            for bias in (None, b):
                torch.testing.assert_close(linear(x, w, bias, as_gemm), torch.nn.functional.linear(x, w, bias),
                                           rtol=1e-5, atol=1e-5)


def test_decoding_form_is_measured_once_per_model(monkeypatch):
    """The first KV cache of a model on the CPU times a decoding step both ways and sets every Linear to the
    faster; later caches reuse the answer; measuring draws nothing from the global RNG (seeds still reproduce)
    and both forms decode the same numbers."""
    model = Transformer(2, C, NH).eval()
    measured = []
    real = Transformer.time_decoding_step

    def spy(self, *args):
        measured.append(real(self, *args))
        return measured[-1]
    monkeypatch.setattr(Transformer, "time_decoding_step", spy)
    torch.manual_seed(0)
    cache = model.new_cache(2, 8)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
    assert len(measured) == 1 and measured[0] > 0 and model.decode_as_gemm is (measured[0] < 1)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 6 and all(m.as_gemm is model.decode_as_gemm for m in linears)
    assert cache.length == 0 and model.new_cache(2, 8).length == 0 and len(measured) == 1  # measured once
    x = randn(2, 5, C)
    for as_gemm in (True, False):
        model.set_decode_as_gemm(as_gemm)
        with torch.no_grad():
            cache = model.new_cache(2, 5)
            steps = torch.cat([model(x[:, t:t + 1], causal=True, cache=cache) for t in range(5)], dim=1)
            torch.testing.assert_close(steps, model(x, causal=True), rtol=1e-5, atol=1e-5)
