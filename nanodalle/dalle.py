"""The DALL-E 1 transformer (Ramesh et al. 2021, §2.2 and App. B): caption tokens, then image tokens.

A decoder-only transformer models one stream: a caption of L BPE tokens followed by the N = h·w codes of
the image's dVAE grid, read row by row. Trained by maximum likelihood on every next token, it generates an
image for a caption by sampling the N image codes one at a time; the dVAE decoder turns them into pixels.

    input   [bos] t_0 t_1 ... t_{L-1}  i_0 i_1 ... i_{N-2}        (L + N positions)
    target   t_0  t_1 ...     t_{L-1}  i_0 i_1 ... i_{N-1}
             \\____ text head ______/  \\____ image head ___/

Position p predicts the token at p + 1 of the stream (a learned [bos] starts it), so the last text position
predicts the first image code. Text and image have their own embedding tables; each output head is its
embedding table transposed (tied weights), so a text position can only ever predict a text token and an
image position only an image code. Captions shorter than L are padded with a *different* pad token at every
position (§2.2: "a special padding token ... unique to each of the 256 text positions"), so the model
always knows where it is in the caption. Text positions get learned embeddings; image positions the sum of
a row and a column embedding (App. B.1). Loss: 1/8 · text cross-entropy + 7/8 · image cross-entropy
(§2.2, each averaged over its own tokens): the image is what we want to generate.

Attention masks (App. B.1, Figure 11): every image token attends to all text tokens; text is causal. Among
image tokens, "full" is the plain causal mask; the paper's "sparse" schedule gives layer i (1-based) a
*column* mask when (i − 2) mod 4 = 0, a *row* mask otherwise, and a causal *convolutional* mask (11×11 at
full size) in the last layer. All are static boolean masks handed to nanodalle.transformer, so they work
with the KV cache as they are.

Shapes: B batch, L text tokens, N = h·w image codes, T = L + N positions, C width, K image vocabulary.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanodalle.transformer import Transformer, init_weights, linear

TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 1 / 8, 7 / 8  # DALL-E §2.2


@dataclass
class DALLEConfig:
    text_len: int = 20          # L, caption tokens (paper: 256); the longest shapes caption is 19 + eot
    text_vocab: int = 4098      # BPE ids incl. eot and pad: train_transformer.py sets it from the tokenizer
    pad_id: int = 4097          # the tokenizer's pad id, replaced by a unique pad token per position
    grid_size: int = 8          # h = w of the dVAE code grid (paper: 32): set from the dVAE
    image_vocab: int = 512      # K, the dVAE codebook size (paper: 8192): set from the dVAE
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    attention: str = "full"     # "full": causal everywhere; "sparse": the paper's row/column/conv schedule
    conv_kernel: int = 11       # side of the convolutional mask of the last layer ("sparse")
    cond_drop: float = 0.1      # classifier-free guidance: the caption is dropped this often in training
    # --- a sampling setting, saved with the model (the transformer itself does not read it)
    temperature: float = 1.0    # generate()'s default (paper: 1); sample.py and evaluate's --temperature override it

    @property
    def image_len(self) -> int:
        return self.grid_size ** 2  # N


PRESETS = {
    # 32 px images as the toy dVAE's 16×16 codes (K = 512) after 20 caption tokens, a 276-token stream, with
    # the paper's sparse masks (a 5×5 conv window on a 16×16 grid): trains on a 2-core CPU in 20 minutes, and a
    # lower temperature draws cleaner outlines from a model this short-trained (README, results).
    "toy": dict(text_len=20, grid_size=16, image_vocab=512, n_layer=4, n_head=6, n_embd=192, attention="sparse",
                conv_kernel=5, temperature=0.5),
    # 128 px as 16×16 codes, K = 2048, 12 layers 768 wide (GPT-2 small): one GPU, hours
    "small": dict(text_len=64, grid_size=16, image_vocab=2048, n_layer=12, n_head=12, n_embd=768,
                  attention="sparse", conv_kernel=5),
    # the paper's 12B: 64 layers, 62 heads × 64 = 3968 wide, 256 text tokens (vocab 16,384), 32×32 codes (8192)
    "full": dict(text_len=256, text_vocab=16384 + 2, pad_id=16385, grid_size=32, image_vocab=8192, n_layer=64,
                 n_head=62, n_embd=3968, attention="sparse", conv_kernel=11),
}


# ----------------------------------------------------------------------------------------------------
# attention masks (App. B.1, Figure 11)

def image_mask(kind: str, grid: int, kernel: int = 11) -> torch.Tensor:
    """(N, N) boolean: may image token q attend to image token k? Tokens in raster order, N = grid².

    row     k is one of the grid + 1 tokens ending at q: the rest of q's row so far and the end of the row
            above, which includes the token right above q + 1 (the one being predicted from q)
    column  k is above q in the same column (or q itself)
    conv    k is in the kernel × kernel window centred on q, and not after q
    All three are causal (k ≤ q); stacked over layers, they let every token reach every earlier one.
    """
    n = grid * grid
    q = torch.arange(n)[:, None]  # (N, 1) query index
    k = torch.arange(n)[None, :]  # (1, N) key index
    causal = k <= q
    if kind == "row":
        return causal & (q - k <= grid)
    if kind == "column":
        return causal & ((q - k) % grid == 0)
    if kind == "conv":
        r = kernel // 2
        near_rows = (q // grid - k // grid).abs() <= r
        near_cols = (q % grid - k % grid).abs() <= r
        return causal & near_rows & near_cols
    raise ValueError(f"unknown image mask {kind!r}: use row, column or conv")


def layer_kinds(cfg: DALLEConfig) -> list[str]:
    """The mask of each layer. Sparse (App. B.1): column when (i − 2) mod 4 = 0 for 1-based i, else row;
    the last layer convolutional."""
    if cfg.attention == "full":
        return ["full"] * cfg.n_layer
    if cfg.attention != "sparse":
        raise ValueError(f"unknown attention {cfg.attention!r}: use full or sparse")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, cfg.n_layer + 1)]
    kinds[-1] = "conv"
    return kinds


def stream_mask(kind: str, cfg: DALLEConfig) -> torch.Tensor:
    """(T, T) mask over the whole input stream: [bos + L text | N − 1 image] positions."""
    L, N = cfg.text_len, cfg.image_len
    T = L + N
    mask = torch.ones(T, T, dtype=torch.bool).tril()  # causal everywhere: the text part stays this
    if kind != "full":
        # rows/cols L+1.. hold image codes i_0..i_{N-2}; the image block of the mask is the sparse pattern
        mask[L + 1:, L + 1:] = image_mask(kind, cfg.grid_size, cfg.conv_kernel)[:N - 1, :N - 1]
    return mask


# ----------------------------------------------------------------------------------------------------
# the model

class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.cfg = cfg
        L, C, g = cfg.text_len, cfg.n_embd, cfg.grid_size
        self.text_embedding = nn.Embedding(cfg.text_vocab + L, C)  # BPE ids, then L unique pad tokens
        self.text_pos = nn.Embedding(L + 1, C)                       # bos + L text positions
        self.bos = nn.Parameter(torch.empty(C))                      # the learned start of the stream
        self.image_embedding = nn.Embedding(cfg.image_vocab, C)
        self.row_embedding = nn.Embedding(g, C)                      # image position = row + column (App. B.1)
        self.col_embedding = nn.Embedding(g, C)
        self.transformer = Transformer(cfg.n_layer, C, cfg.n_head, cfg.dropout)
        # One mask per distinct kind, shared by the layers that use it (64 copies at full size would be 100 MB).
        kinds = layer_kinds(cfg)
        self.layer_kinds = kinds
        for kind in sorted(set(kinds) - {"full"}):
            self.register_buffer(f"mask_{kind}", stream_mask(kind, cfg), persistent=False)
        init_weights(self, cfg.n_layer)  # embeddings N(0, 0.02) like every Linear; residual outputs scaled
        nn.init.normal_(self.bos, std=0.02)

    def masks(self):
        """None for full attention (plain causal, SDPA's fast path), else one (T, T) mask per layer."""
        if self.cfg.attention == "full":
            return None
        return [getattr(self, f"mask_{kind}") for kind in self.layer_kinds]

    # --- embedding the stream --------------------------------------------------------------------

    def unique_pads(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) tokenizer ids -> ids where the pad at position j becomes text_vocab + j (§2.2)."""
        L = text.size(1)
        pads = self.cfg.text_vocab + torch.arange(L, device=text.device)  # (L,)
        return torch.where(text == self.cfg.pad_id, pads, text)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) caption ids -> (B, 1 + L, C): bos, then the caption, with their positions."""
        B, L = text.shape
        if L != self.cfg.text_len:
            raise ValueError(f"captions must be {self.cfg.text_len} tokens (padded), got {L}")
        tok = self.text_embedding(self.unique_pads(text))             # (B, L, C)
        tok = torch.cat([self.bos.expand(B, 1, -1), tok], dim=1)      # (B, 1 + L, C)
        return tok + self.text_pos.weight                              # (B, 1 + L, C)

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, n) image codes number start..start+n-1 in raster order -> (B, n, C) with row + column positions."""
        g = self.cfg.grid_size
        idx = torch.arange(start, start + codes.size(1), device=codes.device)  # (n,) raster index
        pos = self.row_embedding(idx // g) + self.col_embedding(idx % g)        # (n, C)
        return self.image_embedding(codes) + pos                               # (B, n, C)

    def heads(self, h: torch.Tensor, first: int):
        """Features (B, n, C) of stream positions first..first+n-1 -> (text logits, image logits).

        Positions < L predict text (logits over the text table, (B, ·, text_vocab + L)), the others image
        codes ((B, ·, K)): each head is its embedding table transposed (tied, as in GPT-2)."""
        n_text = max(0, min(self.cfg.text_len - first, h.size(1)))
        text_logits = h[:, :n_text] @ self.text_embedding.weight.t()    # (B, n_text, text_vocab + L)
        image_logits = linear(h[:, n_text:], self.image_embedding.weight,  # (B, n - n_text, K)
                              as_gemm=bool(self.transformer.decode_as_gemm))
        return text_logits, image_logits

    def forward(self, text: torch.Tensor, codes: torch.Tensor):
        """The training loss. text (B, L) caption ids, codes (B, N) the image's dVAE codes.

        Returns (loss, text_loss, image_loss): loss = 1/8 · text CE + 7/8 · image CE (§2.2)."""
        x = torch.cat([self.embed_text(text), self.embed_image(codes[:, :-1])], dim=1)  # (B, L + N, C)
        h = self.transformer(x, mask=self.masks(), causal=True)                          # (B, L + N, C)
        text_logits, image_logits = self.heads(h, 0)  # (B, L, text_vocab + L), (B, N, K)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), self.unique_pads(text).flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        return TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * image_loss, text_loss, image_loss

    # --- sampling --------------------------------------------------------------------------------

    def null_text(self, batch_size: int, device) -> torch.Tensor:
        """An empty caption (pads only): what the model sees for a dropped caption (guidance)."""
        return torch.full((batch_size, self.cfg.text_len), self.cfg.pad_id, dtype=torch.long, device=device)

    def next_logits(self, text, codes, cache=None):
        """Logits (B, K) of the next image code after `codes` (B, n), the n codes so far (n may be 0).

        Without a cache: one forward over the whole stream. With a cache: the first call (cache empty) runs
        the caption and the codes given; each later call feeds only the newest code, the rest is cached."""
        if cache is None or cache.length == 0:
            x = self.embed_text(text)                                       # (B, 1 + L, C)
            if codes.size(1) > 0:
                x = torch.cat([x, self.embed_image(codes)], dim=1)          # (B, 1 + L + n, C)
        else:
            n = codes.size(1)
            x = self.embed_image(codes[:, -1:], start=n - 1)                # (B, 1, C): the newest code
        first = 0 if cache is None else cache.length                        # stream position of x[:, 0]
        h = self.transformer(x, mask=self.masks(), causal=True, cache=cache)
        _, image_logits = self.heads(h[:, -1:], first + x.size(1) - 1)      # the last position only
        logits = image_logits[:, -1]                                        # (B, K)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # sample in ≥ float32 precision

    @torch.inference_mode()  # no_grad, and no autograd bookkeeping at all: ~5% faster per decoding step
    def generate(self, text: torch.Tensor, prompt_codes: torch.Tensor | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, cond_scale: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True, progress: bool = False):
        """Sample the image codes (B, N) for captions `text` (B, L), one code at a time.

        prompt_codes (B, r): the first r codes are given (e.g. the top rows of an image, §3.3) and kept.
        temperature None: the config's (toy 0.5, else the paper's 1). cond_scale ≠ 1: classifier-free
        guidance, logits = null + s · (cond − null), the null stream reading an empty caption. use_cache=False
        recomputes the whole stream at every step (for testing and benchmarks: both give the same codes).
        """
        B, N, device = text.size(0), self.cfg.image_len, text.device
        codes = torch.zeros(B, 0, dtype=torch.long, device=device) if prompt_codes is None else prompt_codes
        guided = cond_scale != 1.0
        temperature = self.cfg.temperature if temperature is None else temperature
        stream = torch.cat([text, self.null_text(B, device)]) if guided else text  # (B or 2B, L)
        cache = self.transformer.new_cache(stream.size(0), self.cfg.text_len + N) if use_cache else None
        for _ in tqdm(range(codes.size(1), N), disable=not progress, desc="image tokens", leave=False):
            both = torch.cat([codes, codes]) if guided else codes
            logits = self.next_logits(stream, both, cache)                    # (B or 2B, K)
            if guided:
                cond, null = logits.chunk(2)
                logits = null + cond_scale * (cond - null)
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
            codes = torch.cat([codes, nxt[:, None]], dim=1)
        return codes  # (B, N)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Draw one id per row of (B, K) logits: temperature, then keep the top-k, then the smallest set whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020). Temperature 0 takes the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]         # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)           # (B, K) mass of the top 1, 2, ... ids
        drop = cum - F.softmax(sorted_logits, dim=-1) >= top_p          # the mass before this id already suffices
        drop_in_place = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
        logits = logits.masked_fill(drop_in_place, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def drop_captions(text: torch.Tensor, p: float, pad_id: int, generator=None) -> torch.Tensor:
    """Replace each caption by the empty caption with probability p (classifier-free guidance training)."""
    if p <= 0:
        return text
    dropped = torch.rand(text.size(0), device=text.device, generator=generator) < p  # (B,)
    return torch.where(dropped[:, None], torch.full_like(text, pad_id), text)
