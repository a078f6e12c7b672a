"""The unCLIP diffusion prior (Ramesh et al. 2022, §2.2 and App. C): caption -> CLIP image embedding z_i.

A frozen CLIP gives a caption y its text embedding z_t (B, D) and per-token features (B, L, text_width) (the
"encoded text"). The prior is a Gaussian diffusion model over z_i: a decoder-only transformer reads one
sequence per sample, in the paper's order,

    [ caption token features (L) | z_t | timestep t | noised z_i^(t) | learned query ]     T = L + 4 tokens
      0 ...................... L-1    L       L+1          L+2               L+3

under a causal mask (caption padding masked out as keys), and its output at the final query is the
un-noised embedding: unCLIP §2.2 trains it to predict z_i itself with an MSE,
    L_prior = E_{t, z_i^(t)} ‖ f_θ(z_i^(t), t, y) − z_i ‖²       (diffusion.GaussianDiffusion(predict="x0"))

The scale. CLIP embeddings are unit vectors, so each of their D coordinates has variance ≈ 1/D (1/128 for the
toy CLIP), while the diffusion's noise is N(0, I): at the noisiest steps the signal would vanish far sooner
than the schedule intends (√ᾱ_t · z against √(1 − ᾱ_t) · ε, with z about √D times smaller than ε). So the
prior diffuses √D · z_i, whose coordinates have variance ≈ 1 like the noise, the scale the cosine schedule is
designed for (as images in [-1, 1] are; DALLE2-pytorch's prior does the same). z_t is fed at the same scale.
Samples are divided by √D and, as they need not land exactly on the sphere, renormalised to unit length
(the normalisation absorbs the ÷√D).

Guidance. 10% of training captions are dropped (unCLIP §2.2, cond_drop): z_t is replaced by a learned null
vector and every caption token is masked out of the attention, so a dropped sample's prediction depends on
nothing of its caption (exactly: masked keys get no weight). That is the unconditional model of classifier-
free guidance (Ho & Salimans 2022). Sampling draws n_candidates = 2 embeddings per caption and keeps the one
with the higher dot product with z_t (unCLIP App. C), taken once both are unit vectors: a cosine.

Sampling reuses the caption: under the causal mask the caption and z_t (the first L + 1 tokens) never see t
or z_i^(t), so their keys and values are computed once per caption (a KV cache) and each of the 64 DDIM steps
runs only the last 3 tokens (7× fewer at L = 20). In training every sample has its own caption, so all
L + 4 tokens run; the caption is the bulk of the compute.
Shapes: B batch, L caption tokens, T = L + 4, C width (n_embd), D the CLIP embedding.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodalle.diffusion import GaussianDiffusion, guided_batched, timestep_embedding
from nanodalle.transformer import Transformer, init_weights

N_SPECIAL = 4  # z_t, timestep, noised z_i, query: the tokens after the caption


@dataclass
class PriorConfig:
    embed_dim: int = 128        # D, CLIP's embedding: train_prior.py sets it from the CLIP checkpoint
    text_len: int = 20          # L, caption tokens (CLIP's context_length): set from CLIP
    text_width: int = 64        # width of CLIP's per-token text features: set from CLIP
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    timesteps: int = 1000       # unCLIP App. C: 1000 steps, cosine schedule
    schedule: str = "cosine"
    sample_steps: int = 64      # unCLIP App. C: 64 sampling steps (DDIM)
    # classifier-free guidance at sampling, 1 = none. The paper gives no value (Karlo, a public unCLIP
    # reproduction, uses 4). On a barely trained toy CLIP, prior_cosine_to_true went 0.903 (1), 0.930 (2),
    # 0.940 (4); 2 is a middle ground, as higher scales trade diversity for that number. It costs 2× sampling.
    guidance_scale: float = 2.0
    cond_drop: float = 0.1      # unCLIP §2.2: the caption is dropped 10% of the time in training


PRESETS = {
    # on the toy CLIP's embeddings (D 128, 20 tokens × 64): trains on a 2-core CPU in minutes
    "toy": dict(embed_dim=128, text_len=20, text_width=64, n_layer=4, n_head=8, n_embd=256),
    # on the small CLIP (D 512, 77 tokens × 512): one GPU, hours
    "small": dict(embed_dim=512, text_len=77, text_width=512, n_layer=12, n_head=12, n_embd=768),
    # unCLIP App. C: width 2048 × 24 blocks ≈ 1B parameters, on ViT-H/16 (D 1024, text width 1024)
    "full": dict(embed_dim=1024, text_len=77, text_width=1024, n_layer=24, n_head=32, n_embd=2048),
}


def select_best(candidates: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """unCLIP App. C: of n candidates per caption (B, n, D), keep the one with the higher dot product with
    z_t (B, D). Returns (B, D)."""
    scores = (candidates * text_emb[:, None, :]).sum(dim=-1)  # (B, n)
    best = scores.argmax(dim=1)  # (B,)
    return candidates[torch.arange(candidates.size(0), device=candidates.device), best]  # (B, D)


class DiffusionPrior(nn.Module):
    """forward -> the training loss; denoise -> x̂_0; sample -> unit CLIP image embeddings.

    Conditioning is always the triple (text_emb (B, D) unit, token_feats (B, L, text_width), pad_mask (B, L)
    bool, True = a real caption token: up to and including CLIP's eot, False = the padding after it).
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        C, D = cfg.n_embd, cfg.embed_dim
        self.scale = math.sqrt(D)  # unit CLIP vectors × √D: variance ≈ 1 per coordinate (see the top)
        self.token_proj = nn.Linear(cfg.text_width, C)  # CLIP's per-token features -> width
        self.text_proj = nn.Linear(D, C)                # z_t
        self.time_mlp = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))  # sinusoids of t -> width
        self.image_proj = nn.Linear(D, C)               # z_i^(t)
        self.query = nn.Parameter(torch.empty(C))       # the learned final query, where the output is read
        self.null_text = nn.Parameter(torch.empty(C))   # replaces z_t's token when the caption is dropped
        # positions 0..L-1 for the caption, L..L+3 for the 4 tokens after it (fixed even when a batch's
        # captions are cut short: see denoise)
        self.pos_embedding = nn.Parameter(torch.empty(cfg.text_len + N_SPECIAL, C))
        self.transformer = Transformer(cfg.n_layer, C, cfg.n_head, cfg.dropout)
        self.head = nn.Linear(C, D)
        self.diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, predict="x0")  # unCLIP §2.2
        self.init_weights()

    def init_weights(self):
        """GPT-2 init everywhere (transformer.init_weights), then the prior's own parameters."""
        init_weights(self, self.cfg.n_layer)
        nn.init.normal_(self.query, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.01)
        nn.init.zeros_(self.head.weight)  # the first prediction is 0, the mean of the data: a calm start
        nn.init.zeros_(self.head.bias)

    # --- the network ----------------------------------------------------------------------------------

    def embed_prefix(self, text_emb, token_feats, pad_mask, drop=None):
        """The first L' + 1 tokens (caption, z_t), which do not depend on t: (B, L'+1, C) and the key mask
        (B, L'+1). drop (B,) bool: these captions are dropped (null z_t, every caption token masked)."""
        B, L, _ = token_feats.shape
        if L > self.cfg.text_len:
            raise ValueError(f"{L} caption tokens, but the prior's text_len is {self.cfg.text_len}")
        tokens = self.token_proj(token_feats) + self.pos_embedding[:L]  # (B, L, C)
        text = self.text_proj(text_emb * self.scale)  # (B, D) -> (B, C)
        if drop is not None:
            text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)  # (B, C)
            pad_mask = pad_mask & ~drop[:, None]  # (B, L): a dropped caption is not attended to at all
        text = text + self.pos_embedding[self.cfg.text_len]
        x = torch.cat([tokens, text[:, None, :].to(tokens.dtype)], dim=1)  # (B, L+1, C)
        mask = F.pad(pad_mask, (0, 1), value=True)  # (B, L+1): z_t's token is always real
        return x, mask

    def embed_suffix(self, x_t, t):
        """The last 3 tokens (timestep, z_i^(t), query): (B, 3, C). x_t is in the diffusion's scale (× √D)."""
        pos = self.pos_embedding[self.cfg.text_len + 1:]  # (3, C)
        time = self.time_mlp(timestep_embedding(t, self.cfg.n_embd))  # (B, C)
        image = self.image_proj(x_t)  # (B, D) -> (B, C)
        query = self.query.to(image.dtype).expand_as(image)  # (C,) -> (B, C)
        return torch.stack([time.to(image.dtype), image, query], dim=1) + pos  # (B, 3, C)

    def denoise(self, x_t, t, text_emb, token_feats, pad_mask, drop=None):
        """x̂_0 (B, D): the un-noised embedding predicted from x_t (B, D) at steps t (B,), both in the
        diffusion's scale (√D × CLIP space). Captions may be cut to their longest real length L' ≤ L: the
        cut positions are padding, masked, and the 4 last tokens keep their positions, so nothing changes."""
        prefix, mask = self.embed_prefix(text_emb, token_feats, pad_mask, drop)  # (B, L'+1, C), (B, L'+1)
        x = torch.cat([prefix, self.embed_suffix(x_t, t).to(prefix.dtype)], dim=1)  # (B, L'+4, C)
        mask = F.pad(mask, (0, N_SPECIAL - 1), value=True)  # (B, L'+4)
        h = self.transformer(x, causal=True, key_padding_mask=mask)  # (B, L'+4, C)
        return self.head(h[:, -1])  # (B, C) -> (B, D): read at the learned query

    def forward(self, image_emb, text_emb, token_feats, pad_mask, t=None, noise=None, drop=None):
        """The training loss (unCLIP §2.2): MSE between x̂_0 and √D · z_i, at t ~ U{0..T-1}, ε ~ N(0, I).

        image_emb, text_emb (B, D) unit CLIP embeddings. In training mode each caption is dropped with
        probability cond_drop unless `drop` (B,) is given; t and noise fix the draws (tests)."""
        if drop is None and self.training:  # (a tensor even when cond_drop = 0: DDP wants null_text used)
            drop = torch.rand(image_emb.size(0), device=image_emb.device) < self.cfg.cond_drop  # (B,)

        def model_fn(x_t, step):
            return self.denoise(x_t, step, text_emb, token_feats, pad_mask, drop)
        return self.diffusion.loss(model_fn, image_emb * self.scale, t, noise)

    # --- sampling -------------------------------------------------------------------------------------

    def cached_model_fn(self, text_emb, token_feats, pad_mask, guidance_scale: float):
        """model_fn(x_t, t) -> x̂_0 for fixed captions: the prefix (caption, z_t) goes through the transformer
        once into a KV cache, and each call runs only the last 3 tokens against it. With guidance (scale ≠ 1)
        the cache holds [conditional; dropped] rows and diffusion.guided_batched combines them."""
        B = text_emb.size(0)
        drop = torch.zeros(B, dtype=torch.bool, device=text_emb.device)
        if guidance_scale != 1:  # rows B..2B-1: the same captions, dropped (the unconditional model)
            text_emb, token_feats, pad_mask = torch.cat([text_emb] * 2), torch.cat([token_feats] * 2), \
                torch.cat([pad_mask] * 2)  # (2B, ...)
            drop = torch.cat([drop, ~drop])  # (2B,)
        prefix, mask = self.embed_prefix(text_emb, token_feats, pad_mask, drop)  # (B', P, C), (B', P)
        P = prefix.size(1)
        mask = F.pad(mask, (0, N_SPECIAL - 1), value=True)  # (B', P+3)
        cache = self.transformer.new_cache(prefix.size(0), P + N_SPECIAL - 1)
        self.transformer(prefix, causal=True, key_padding_mask=mask, cache=cache)  # keys, values of the prefix

        def model_fn(x_t, t):
            cache.length = P  # rewind to the end of the prefix: forget the last call's 3 tokens
            h = self.transformer(self.embed_suffix(x_t, t), causal=True, key_padding_mask=mask, cache=cache)
            return self.head(h[:, -1]).float()  # (B', 3, C) -> (B', D)
        return model_fn if guidance_scale == 1 else guided_batched(model_fn, guidance_scale)

    @torch.no_grad()
    def sample(self, text_emb, token_feats, pad_mask, steps=None, guidance_scale=None, n_candidates: int = 2,
               generator=None, eta: float = 0.0, progress: bool = False):
        """(B, D) unit CLIP image embeddings for B captions: DDIM over `steps` (default cfg.sample_steps),
        n_candidates per caption, the one with the higher dot product with z_t kept (unCLIP App. C)."""
        B, D, n = text_emb.size(0), self.cfg.embed_dim, n_candidates
        steps = steps or self.cfg.sample_steps
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        # rows b·n .. b·n+n-1 are caption b's n candidates
        model_fn = self.cached_model_fn(text_emb.repeat_interleave(n, 0), token_feats.repeat_interleave(n, 0),
                                        pad_mask.repeat_interleave(n, 0), scale)
        x0 = self.diffusion.ddim_sample(model_fn, (B * n, D), steps, eta=eta, generator=generator,
                                        progress=progress)  # (B·n, D), √D × CLIP space
        candidates = F.normalize(x0.float(), dim=-1).view(B, n, D)  # ÷√D and back onto the unit sphere
        return select_best(candidates, text_emb.float())  # (B, D)
