"""The one transformer of nanodalle: multi-head attention written by hand, MLP, Block, Transformer.

Every model of the project uses it: the DALL-E 1 transformer (causal, with row / column / convolutional
sparse masks and a KV cache for sampling), CLIP's text and image encoders, the unCLIP diffusion prior, and
the attention layers of the diffusion UNet (with `context_dim` set: cross-attention to text tokens).

Shape letters, used in comments across the whole project:
    B batch, T sequence length (queries), S key length (when different from T), C channels / width,
    nh heads, hs head size (C = nh · hs), H W image height / width, K codebook size.

Masks. Every mask is boolean and True means "may attend" (the convention of F.scaled_dot_product_attention):
    causal=True           query i sees keys j ≤ i                                   (DALL-E text, CLIP text)
    key_padding_mask      (B, S), True = a real token, False = padding: never attended to
    mask                  a static (T, S) or (B, 1, T, S) mask, e.g. DALL-E's sparse row / column / conv masks
They combine with a logical and. Row p of a static mask is the query at absolute position p; a mask larger
than needed is cut to the rows and columns in use, so one (T_max, T_max) mask serves every length.
A query with no allowed key at all (a padded query) gets 0 from attention, in both paths, never NaN.

KV cache. To sample one token at a time, keys and values of past positions are kept in a KVCache
(preallocated, written in place). With a cache, the T new queries sit at absolute positions
length..length+T-1 and attend to keys 0..length+T-1, so masks are still indexed by absolute position.
"""
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Keys and values of all past positions, one preallocated buffer per layer (one cache per model).

    k[i], v[i]: (B, nh, max_len, hs) for layer i; positions 0..length-1 are filled. A forward with T new
    tokens writes their keys and values in place at length..length+T-1 (no torch.cat, nothing reallocated,
    which is what makes a decoding step cheap), and Transformer.forward then advances `length` by T.
    Set `length` back to rewind (e.g. to reuse a prompt). `context_kv[i]` keeps the keys and values of a
    cross-attention context, computed on the first step and reused after. `qkv_weights[i]` keeps layer i's
    three projection weights stacked into one for decoding steps on the CPU, built on the first (a new cache,
    i.e. a new generate() call, always sees the current weights).
    """

    def __init__(self, n_layer, batch_size, n_head, head_size, max_len, device=None, dtype=None):
        shape = (batch_size, n_head, max_len, head_size)  # (B, nh, max_len, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.context_kv = {}
        self.qkv_weights = {}
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) at positions length..length+T-1; return all of them so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, max_len is {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, as_gemm: bool = False):
    """x @ weightᵀ + bias, like F.linear; with as_gemm, ≤ 16 rows on the CPU without gradients are computed
    as W @ xᵀ instead, the faster form for some models on some CPUs (Transformer.time_decoding_step measures).

    KV-cached decoding feeds one new token per image: x @ Wᵀ has only B rows and its cost is reading W once.
    PyTorch may run such a product on one core (a single row is a GEMV), while the same product written as
    W @ xᵀ with at least two columns goes to the GEMM that runs on every core. Same math, rounding ~1e-7.
    """
    rows = x.numel() // x.size(-1)
    if not as_gemm or x.device.type != "cpu" or not 0 < rows <= 16 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)  # training, prompts, GPUs, models and CPUs whose GEMV is fast
    x2 = x.reshape(rows, -1)  # (rows, in)
    if rows == 1:
        x2 = torch.cat([x2, x2])  # a second (copied) column: W @ xᵀ then goes to the multi-core GEMM
    if bias is None:
        y = weight @ x2.t()  # (out, in) @ (in, rows) -> (out, rows)
    else:
        y = torch.addmm(bias[:, None], weight, x2.t())  # b + W @ xᵀ, (out, rows)
    y = y.t()[:rows].contiguous()  # (rows, out), laid out as F.linear's output (SDPA's fast path needs it)
    return y.reshape(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) computed by `linear` above: faster KV-cached decoding.
    `as_gemm` is set by Transformer.new_cache for the model's decoding steps."""
    as_gemm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.as_gemm)


def build_mask(T: int, S: int, start: int = 0, mask=None, causal=False, key_padding_mask=None, device=None):
    """Combine the masks for T queries at absolute positions start..start+T-1 and S keys 0..S-1 into one
    boolean mask, True = may attend, of shape (T, S), (B, 1, T, S) or (B, 1, 1, S); None if all allowed."""
    allowed = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = may attend), got {mask.dtype}")
        if mask.size(-2) < start + T or mask.size(-1) < S:
            raise ValueError(f"mask {tuple(mask.shape)} is too small: rows are absolute positions, "
                             f"{start + T} rows and {S} columns needed")
        allowed = mask[..., start:start + T, :S]  # (T, S) or (B, 1, T, S): rows = absolute positions
    if causal and start < S - 1:  # (not needed when even the first query sees every key: one cached step)
        rows = torch.arange(start, start + T, device=device)
        cols = torch.arange(S, device=device)
        tril = cols[None, :] <= rows[:, None]  # (T, S): key j is not in the future of query i
        allowed = tril if allowed is None else allowed & tril
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, None, :S]  # (B, 1, 1, S): broadcast over heads and queries
        allowed = real if allowed is None else allowed & real
    return allowed


class Attention(nn.Module):
    """Multi-head attention: softmax(q·kᵀ/√hs + mask) · v, with q, k, v, out linear projections.

    Self-attention by default; with `context_dim` set it is cross-attention: queries come from x (B, T, C),
    keys and values from a context (B, S, context_dim), e.g. text tokens for the diffusion UNet.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0, context_dim=None):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} must be a multiple of n_head {n_head}"
        self.n_head, self.dropout = n_head, dropout
        self.is_cross = context_dim is not None
        kv_dim = context_dim if self.is_cross else n_embd
        self.query = Linear(n_embd, n_embd, bias=bias)
        self.key = Linear(kv_dim, n_embd, bias=bias)
        self.value = Linear(kv_dim, n_embd, bias=bias)
        self.proj = Linear(n_embd, n_embd, bias=bias)  # output projection back into the residual stream
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)

    def project_qkv_stacked(self, x, cache, layer):
        """query(x), key(x), value(x) as (B, nh, T, hs) each, from one matrix product with the three weights
        stacked (3C, C), kept in the cache. The same math as three products; a decoding step's cost is reading
        the weights plus a fixed cost per call, and one call instead of three makes it ~7% faster (bench-long).
        Used on the CPU, where that was measured; on a GPU the stack would be a second copy of a quarter of the
        weights (6 GB for the 12B model in bf16), so GPUs keep the three products."""
        if layer not in cache.qkv_weights:
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3C, C)
            bias = None
            if self.query.bias is not None:
                bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])      # (3C,)
            cache.qkv_weights[layer] = (weight, bias)
        weight, bias = cache.qkv_weights[layer]
        q, k, v = linear(x, weight, bias, self.query.as_gemm).split(x.size(-1), dim=-1)  # (B, T, 3C) -> 3 × (B, T, C)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def forward(self, x, context=None, mask=None, causal=False, key_padding_mask=None, cache=None, layer=0,
                use_sdpa: bool = True):
        """x (B, T, C) -> (B, T, C). use_sdpa picks F.scaled_dot_product_attention (fast) or the same math
        written out below; both give the same numbers. `cache` (KVCache) with `layer` (this layer's index
        in it) turns on incremental decoding. key_padding_mask covers the context in cross-attention."""
        B, T, C = x.shape
        if use_sdpa and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled():
            # Training in bfloat16 on a CPU: PyTorch's fused CPU attention is slow backward in bfloat16 (55 ms
            # of a 175 ms bench-toy DALL-E step); the written-out math below runs as bf16 matmuls, and the
            # whole step gets 1.15× faster.
            use_sdpa = False
        start = cache.length if cache is not None else 0  # absolute position of the first query
        if cache is not None and not self.is_cross and T == 1 and x.device.type == "cpu":
            q, k, v = self.project_qkv_stacked(x, cache, layer)  # a CPU decoding step: (B, nh, 1, hs) each
            k, v = cache.update(layer, k, v)                     # (B, nh, S, hs), S = start + 1
        elif self.is_cross:
            q = self.split_heads(self.query(x))  # (B, nh, T, hs)
            if cache is not None and layer in cache.context_kv:  # the context is fixed while decoding
                k, v = cache.context_kv[layer]
            else:
                if context is None:
                    raise ValueError("this is a cross-attention layer (context_dim set): pass a context")
                k, v = self.split_heads(self.key(context)), self.split_heads(self.value(context))  # (B, nh, S, hs)
                if cache is not None:
                    cache.context_kv[layer] = (k, v)
        else:
            q = self.split_heads(self.query(x))  # (B, nh, T, hs)
            k, v = self.split_heads(self.key(x)), self.split_heads(self.value(x))  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = start + T: every position so far
        S = k.size(2)

        # Plain causal self-attention (training, a prompt): let SDPA skip the masked half on its own.
        sdpa_causal = use_sdpa and causal and mask is None and key_padding_mask is None and start == 0 and T == S
        allowed = None if sdpa_causal else build_mask(T, S, start, mask, causal, key_padding_mask, x.device)
        has_key = None
        if allowed is not None and (mask is not None or key_padding_mask is not None):
            # A row with no allowed key would be softmax over nothing (NaN). Let it attend to every key,
            # so the math stays finite, then zero its output below: attending to nothing gives 0.
            has_key = allowed.any(dim=-1, keepdim=True)  # (..., T, 1)
            allowed = allowed | ~has_key

        dropout_p = self.dropout if self.training else 0.0
        if use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                               is_causal=sdpa_causal)  # (B, nh, T, hs)
        else:
            # the same thing by hand, so there is nothing too scary here
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S): query-key affinities
            if allowed is not None:
                att = att.masked_fill(~allowed, float("-inf"))  # exp(-inf) = 0: no weight on forbidden keys
            att = F.softmax(att, dim=-1)  # each row sums to 1 over the allowed keys
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, S) x (B, nh, S, hs) -> (B, nh, T, hs): weighted sum of the values
        if has_key is not None:
            y = y.masked_fill(~has_key, 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, ratio·C) -> GELU -> Linear(ratio·C, C)."""

    def __init__(self, n_embd: int, mlp_ratio: float = 4, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * n_embd)
        self.fc = Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.proj = Linear(hidden, n_embd, bias=bias)  # output projection back into the residual stream
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block (GPT-2): x + attn(ln(x)) [+ cross_attn(ln(x), context)] + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, context_dim=None,
                 mlp_ratio: float = 4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = Attention(n_embd, n_head, bias, dropout)
        if context_dim is not None:
            self.ln_cross = nn.LayerNorm(n_embd, bias=bias)
            self.cross_attn = Attention(n_embd, n_head, bias, dropout, context_dim=context_dim)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio, bias, dropout)

    def forward(self, x, mask=None, causal=False, key_padding_mask=None, context=None, context_mask=None,
                cache=None, layer=0, use_sdpa=True):
        x = x + self.attn(self.ln_1(x), mask=mask, causal=causal, key_padding_mask=key_padding_mask,
                          cache=cache, layer=layer, use_sdpa=use_sdpa)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.ln_cross(x), context=context, key_padding_mask=context_mask,
                                    cache=cache, layer=layer, use_sdpa=use_sdpa)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of n_layer Blocks and a final LayerNorm: embedded tokens (B, T, C) -> features (B, T, C).

    The caller owns embeddings and output heads, so DALL-E, CLIP and the prior share this one class.
    """

    def __init__(self, n_layer: int, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 context_dim=None, mlp_ratio: float = 4):
        super().__init__()
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        # a plain ModuleList: FSDP wraps, and activation checkpointing recomputes, one block at a time
        self.blocks = nn.ModuleList(
            [Block(n_embd, n_head, dropout, bias, context_dim, mlp_ratio) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        init_weights(self, n_layer)
        self.has_context = context_dim is not None
        self.decode_as_gemm = None  # how decoding steps multiply by the weights on a CPU: set by new_cache

    def forward(self, x, mask=None, causal=False, key_padding_mask=None, context=None, context_mask=None,
                cache=None, use_sdpa=True):
        """`mask` is one boolean (T, S) / (B, 1, T, S) mask for every layer, or a list with one per layer
        (DALL-E: row, column and conv masks). context (B, S, context_dim) and context_mask (B, S) feed the
        cross-attention. With a cache, x holds only the new tokens and the cache advances by T."""
        if isinstance(mask, (list, tuple)) and len(mask) != self.n_layer:
            raise ValueError(f"got {len(mask)} masks for {self.n_layer} layers")
        for i, block in enumerate(self.blocks):
            layer_mask = mask[i] if isinstance(mask, (list, tuple)) else mask
            x = block(x, layer_mask, causal, key_padding_mask, context, context_mask, cache, i, use_sdpa)
        if cache is not None:
            cache.length += x.size(1)
        return self.ln_f(x)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KVCache for this model. device defaults to the model's; dtype to the autocast dtype when
        called inside torch.autocast (keys and values come out of the projections in it), else the model's."""
        w = self.ln_f.weight
        device = device or w.device
        if dtype is None:
            autocast_on = device.type in ("cpu", "cuda", "mps") and torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast_on else w.dtype
        if w.device.type == "cpu" and self.decode_as_gemm is None:  # measured once per model
            # (a stack with cross-attention would need its context to be timed: it keeps x @ Wᵀ)
            self.set_decode_as_gemm(not self.has_context and self.time_decoding_step(batch_size, dtype) < 1)
        return KVCache(self.n_layer, batch_size, self.n_head, self.n_embd // self.n_head, max_len,
                       device=device, dtype=dtype)

    def set_decode_as_gemm(self, as_gemm: bool | None) -> None:
        """Make every Linear of the model compute its few-row products as W @ xᵀ, or not (None: not measured)."""
        self.decode_as_gemm = as_gemm
        for m in self.modules():
            if isinstance(m, Linear):
                m.as_gemm = bool(as_gemm)

    @torch.no_grad()
    def time_decoding_step(self, batch_size: int, dtype) -> float:
        """How long a KV-cached decoding step on the CPU takes with its few-row products as W @ xᵀ (`linear`),
        as a fraction of the time it takes with x @ Wᵀ.

        A decoding step multiplies every weight matrix by B rows, so its cost is reading the weights once, and
        which form reads them faster depends on the CPU, its BLAS, and whether the weights fit in its caches. On
        a 2-core AMD EPYC (Zen 3) x @ Wᵀ is a one-core GEMV, the faster form from the cache (the toy model's 11
        MB), and W @ xᵀ goes to the GEMM that runs on both cores, the faster form from memory (bench-long's
        100 MB: 9.6 against 11-12 ms per token); on a 2-core Intel Xeon x @ Wᵀ was the faster (README,
        efficiency notes). So both are timed on this model's first blocks (up to 256 MB of weights) with a
        throwaway cache, like cuDNN's benchmark mode."""
        weights, blocks = 0, []
        for block in self.blocks:
            if weights > 256e6:
                break
            blocks.append(block)
            weights += sum(p.numel() * p.element_size() for p in block.parameters())
        w = self.ln_f.weight
        cache = KVCache(len(blocks), batch_size, self.n_head, self.n_embd // self.n_head, 2, w.device, dtype)
        x = torch.zeros(batch_size, 1, self.n_embd, device=w.device, dtype=w.dtype)  # zeros: the RNG is left alone
        previous = self.decode_as_gemm

        def step_time(as_gemm):
            self.set_decode_as_gemm(as_gemm)
            cache.length = 1  # a step at position 1: the cost of attention is nil, that of the weights all
            t0 = time.perf_counter()
            for i, block in enumerate(blocks):
                block(x, causal=True, cache=cache, layer=i)
            return time.perf_counter() - t0

        ratios = []
        for _ in range(13):  # the two forms one after the other, so both meet the same noise; 2 rounds of warm-up
            ratios.append(step_time(True) / step_time(False))
        self.set_decode_as_gemm(previous)
        return statistics.median(ratios[2:])


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation, the one place weights are set (models call it on themselves after building):
    Linear and Embedding weights N(0, 0.02), biases 0, LayerNorm 1 and 0, and the two residual output
    projections of each block N(0, 0.02/√(2·n_layer)): every block adds two branches to the residual stream,
    so this keeps its variance from growing with depth (GPT-2 §2.3, Radford et al. 2019)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():  # a second pass: the loop above has just reset these to 0.02
        if isinstance(m, (Attention, MLP)):
            nn.init.normal_(m.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
