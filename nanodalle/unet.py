"""The DALL-E 2 decoder and upsampler UNet: ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs")
with GLIDE's text conditioning (Nichol et al. 2021) and unCLIP's CLIP conditioning (Ramesh et al. 2022, §2.1).

Given a noised image x_t and its step t, the UNet predicts the noise ε, or v (diffusion.py turns that into a loss
and a sampler). It works at every scale: ResBlocks at H×W, then H/2, H/4..., and back up, each level on the
way up reading the features the way down left at its scale (skip connections):

    x_t ─conv─► [ResBlock (+attn)] × n ─down─► ... ─► middle ─► ... ─up─► [ResBlock (+attn)] × (n+1) ─► ε̂
                          └──────────── skip connections, concatenated ─────────────┘
    t ─► sinusoid ─► MLP ──────────────────┐
    CLIP image embedding z_i ─► Linear ────┼─► emb (B, 4·C0): scales and shifts every ResBlock's GroupNorm
    caption ─► text transformer ─► last ───┘
                      └─► per-token encodings ─┐
    z_i ─► Linear ─► 4 extra tokens ───────────┴─► context (B, S, text_width): every attention layer reads it

Decoder (unCLIP §2.1): conditioned on z_i and the caption, 64 px (toy: 32 px). Upsamplers (unCLIP §2.1,
ADM's super-resolution models): conditioned on a low-resolution image only, upsampled bilinearly to H×W and
concatenated to x_t as extra input channels (the blur unCLIP §2.1 applies to it in training is the caller's).
Classifier-free guidance (GLIDE §2.3): the caller drops conditioning with the masks forward() takes.
Shapes: B batch, C channels, H W feature map, T caption tokens, S context tokens, D CLIP embedding.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodalle.diffusion import timestep_embedding
from nanodalle.transformer import Attention, Transformer


@dataclass
class UNetConfig:
    image_size: int = 32              # H = W of x_t and of the output
    in_channels: int = 3
    out_channels: int = 3             # 3: ε; 6: ε and the variance (Improved DDPM §3.1, as GLIDE and unCLIP)
    base_channels: int = 32           # C0, the first level's width (ADM: model_channels)
    channel_mults: str = "1,2,4"      # level i is C0·mults[i] wide, with a 2× downsampling between levels
    num_res_blocks: int = 1           # ResBlocks per level on the way down, one more on the way up ("depth")
    attention_resolutions: str = "16,8"  # feature-map sizes with attention, middle block included; "" = none
    head_channels: int = 32           # channels per attention head (ADM: 64); heads = width / head_channels
    dropout: float = 0.0              # in every ResBlock
    clip_dim: int = 128               # D of the CLIP image embedding; 0 = not conditioned on CLIP
    n_clip_tokens: int = 4            # unCLIP §2.1: z_i is also projected to 4 extra context tokens
    text_vocab: int = 4098            # caption tokens (tokenizer.vocab_size); 0 = not conditioned on a caption
    text_len: int = 20                # caption length the positions are learned for
    text_width: int = 64              # the text transformer's width = the width of every context token
    text_layers: int = 2
    text_heads: int = 2
    pad_id: int = 4097                # tokenizer.pad_id: padding is masked out everywhere
    low_res: bool = False             # upsampler: forward() takes a low-resolution image to upsample
    # --- training and sampling settings, saved with the model (the UNet itself does not read them)
    low_res_size: int = 0             # upsampler: the size of the image it upsamples (the decoder's output)
    train_crop: int = 0               # upsampler: train on random crops this big (unCLIP §2.1: 1/4 of the side)
    blur_sigma: float = 0.6           # upsampler: Gaussian blur (3×3) of the low-res image in training (§2.1)
    timesteps: int = 1000             # unCLIP App. C: 1000 steps, cosine schedule
    schedule: str = "cosine"
    schedule_shift: float = 1.0       # > 1: SNR_t / shift² at every t, noisier (diffusion.shift_betas says why)
    predict: str = "v"                # what the output is: "eps" (DDPM, unCLIP), "v" or "x0" (diffusion.py says why v)
    snr_gamma: float = 0.0            # > 0: Min-SNR-γ loss weighting (Hang et al. 2023; diffusion.loss); 0: L_simple
    clip_drop: float = 0.1            # unCLIP §2.1: z_i dropped 10% of the time in training ...
    text_drop: float = 0.5            # ... and the caption 50%
    sample_steps: int = 50            # DDIM steps at sampling (unCLIP: 250 decoder, 27 and 15 upsamplers)
    guidance_scale: float = 3.0       # classifier-free guidance at sampling (both z_i and caption dropped)


# Parameter counts on the meta device, everything in the module (UNet, text transformer with its embeddings,
# CLIP projections, null embeddings): toy 3.37M (text encoder 0.36M), toy_upsampler 2.59M, small 132M,
# small_upsampler 82.8M, full 3.29B = 2.05B UNet + 1.24B text encoder (unCLIP: 3.5B), full_upsampler 678M (unCLIP: 700M),
# full_upsampler2 253M (unCLIP: 300M). tests/test_unet.py checks them against ranges.
PRESETS = {
    # 32 px, 32/64/128 channels, depth 1 (depth 2 costs 1.4× the time), attention at 16 and 8: 38 GFLOP
    # per training step at batch 16. The text encoder is as narrow as the toy CLIP's; clip_dim = its embed_dim.
    "toy": dict(image_size=32, base_channels=32, channel_mults="1,2,4", num_res_blocks=1,
                attention_resolutions="16,8", head_channels=32, clip_dim=128, text_vocab=4098, text_len=20,
                text_width=64, text_layers=2, text_heads=2, pad_id=4097),
    # 32 -> 64 px, conditioned on the low-res image only: no caption, no CLIP, no attention (unCLIP §2.1), so
    # it is fully convolutional and can train on random crops (32×32 crops: ~4× cheaper than whole images)
    # and sample at the full size.
    "toy_upsampler": dict(image_size=64, base_channels=32, channel_mults="1,2,4", num_res_blocks=1,
                          attention_resolutions="", clip_dim=0, text_vocab=0, low_res=True, low_res_size=32,
                          train_crop=32, sample_steps=25, guidance_scale=1.0),
    # 64 px decoder for one GPU: a quarter of the full width, ViT-B-sized CLIP embedding
    "small": dict(image_size=64, base_channels=128, channel_mults="1,2,3,4", num_res_blocks=2,
                  attention_resolutions="32,16,8", head_channels=64, dropout=0.1, clip_dim=512,
                  text_vocab=16386, text_len=77, text_width=512, text_layers=8, text_heads=8, pad_id=16385),
    # 64 -> 256 px for one GPU: the full upsampler at 128 channels, depth 2
    "small_upsampler": dict(image_size=256, base_channels=128, channel_mults="1,2,3,4", num_res_blocks=2,
                            attention_resolutions="", clip_dim=0, text_vocab=0, low_res=True, low_res_size=64,
                            train_crop=64, sample_steps=27, guidance_scale=1.0),
    # unCLIP App. C decoder: 64 px, 512 channels, depth 3, mults 1,2,3,4, attention at 32/16/8, 64 channels
    # per head, ViT-H CLIP (D = 1024); GLIDE §4's text transformer: 24 blocks of width 2048; dropout 0.1.
    # The vocabulary is a 16,384-token BPE + eot + pad (train_decoder.py sets it from the tokenizer in use).
    "full": dict(image_size=64, base_channels=512, channel_mults="1,2,3,4", num_res_blocks=3,
                 attention_resolutions="32,16,8", head_channels=64, dropout=0.1, clip_dim=1024,
                 text_vocab=16386, text_len=128, text_width=2048, text_layers=24, text_heads=32, pad_id=16385,
                 sample_steps=250),
    # unCLIP App. C: 64 -> 256 upsampler, 320 channels, depth 3, mults 1,2,3,4, no attention (700M there)
    "full_upsampler": dict(image_size=256, base_channels=320, channel_mults="1,2,3,4", num_res_blocks=3,
                           attention_resolutions="", clip_dim=0, text_vocab=0, low_res=True, low_res_size=64,
                           train_crop=64, sample_steps=27, guidance_scale=1.0),
    # 256 -> 1024 (unCLIP: 300M, 192 channels): an approximation, 6 levels of mults 1,1,2,2,4,4, depth 2
    "full_upsampler2": dict(image_size=1024, base_channels=192, channel_mults="1,1,2,2,4,4", num_res_blocks=2,
                            attention_resolutions="", clip_dim=0, text_vocab=0, low_res=True, low_res_size=256,
                            train_crop=256, sample_steps=15, guidance_scale=1.0),
}


def parse_ints(s: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; "" -> []. (Config fields are strings so that argparse can set them.)"""
    return [int(v) for v in s.split(",") if v.strip()]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (ADM), halved until they divide the width and hold at least 4 channels each
    (toy widths: 32 channels -> 8 groups of 4, rather than 32 groups of 1)."""
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < 4):
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """x + conv(dropout(SiLU(AdaGN(conv(SiLU(GroupNorm(x))), emb)))), AdaGN(h, emb) = GroupNorm(h)·(1 + s) + b
    with (s, b) = Linear(SiLU(emb)) (ADM §3: "adaptive group normalization"): the timestep and the conditioning
    scale and shift every channel. A 1×1 conv matches the skip path when the width changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)  # zero-initialised: the block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)  # (B, 2·c_out) -> 2 × (B, c_out)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]  # broadcast over H and W
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """x + attention over the pixels of a feature map, whose keys and values also include the context tokens.

    GLIDE §4 (and its AttentionBlock): the text encodings are projected to each attention layer's width and
    concatenated to its keys and values, so one softmax weighs pixels and words together. nanodalle's
    Attention does exactly that when it is a "cross-attention" (context_dim set) whose context we build
    here as [pixels; projected context tokens]: one attention, not a self- plus a separate cross-attention.
    Without context tokens it is plain self-attention over the pixels.
    """

    def __init__(self, channels: int, head_channels: int, context_width: int):
        super().__init__()
        assert channels % head_channels == 0, f"width {channels} is not a multiple of head_channels {head_channels}"
        self.norm = group_norm(channels)
        self.attn = Attention(channels, channels // head_channels, context_dim=channels)  # attn.proj: zero-init
        self.context_proj = nn.Linear(context_width, channels) if context_width else None

    def forward(self, x, context=None, context_mask=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H·W, C): one token per pixel
        kv, mask = h, None
        if context is not None:
            kv = torch.cat([h, self.context_proj(context)], dim=1)  # (B, H·W + S, C)
            if context_mask is not None:  # pixels are always attended to; padding in the context never
                mask = torch.cat([context_mask.new_ones(B, H * W), context_mask], dim=1)  # (B, H·W + S)
        h = self.attn(h, context=kv, key_padding_mask=mask)  # (B, H·W, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, H·W, C) -> (B, C, H, W)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a stride-2 3×3 conv (ADM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour ×2, then a 3×3 conv (ADM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands each ResBlock the embedding and each AttentionBlock the context
    (ADM's TimestepEmbedSequential)."""

    def forward(self, h, emb, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """UNet(cfg)(x_t, t, clip_emb, tokens, low_res, drop_clip, drop_text) -> ε̂ (B, out_channels, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mults, attn_res = parse_ints(cfg.channel_mults), set(parse_ints(cfg.attention_resolutions))
        C0, emb_dim = cfg.base_channels, 4 * cfg.base_channels  # ADM: the embedding is 4× the base width
        assert C0 % 2 == 0, f"base_channels must be even (sin and cos halves), got {C0}"
        ctx_width = cfg.text_width if (cfg.clip_dim or cfg.text_vocab) else 0  # 0: no context tokens at all

        # conditioning: timestep, CLIP image embedding (unCLIP §2.1), caption (GLIDE §4)
        self.time_embed = nn.Sequential(nn.Linear(C0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.clip_dim:
            self.clip_to_emb = nn.Linear(cfg.clip_dim, emb_dim)  # added to the timestep embedding
            self.clip_to_tokens = nn.Linear(cfg.clip_dim, cfg.n_clip_tokens * cfg.text_width)  # 4 context tokens
            self.null_clip = nn.Parameter(torch.empty(cfg.clip_dim))  # stands in for a dropped z_i
        if cfg.text_vocab:
            self.token_embedding = nn.Embedding(cfg.text_vocab, cfg.text_width)
            self.text_pos = nn.Parameter(torch.empty(cfg.text_len, cfg.text_width))
            self.text_transformer = Transformer(cfg.text_layers, cfg.text_width, cfg.text_heads)
            self.text_to_emb = nn.Linear(cfg.text_width, emb_dim)  # the last token's features, added to emb
            self.null_text = nn.Parameter(torch.empty(cfg.text_width))  # pooled features of an all-pad caption

        def block(c_in, c_out, res):  # a ResBlock, then attention if this resolution asks for it
            layers = [ResBlock(c_in, c_out, emb_dim, cfg.dropout)]
            if res in attn_res:
                layers.append(AttentionBlock(c_out, cfg.head_channels, ctx_width))
            return EmbedSequential(*layers)

        # the way down: record the width of every output, each is a skip connection for the way up
        in_ch = cfg.in_channels * (2 if cfg.low_res else 1)  # upsampler: x_t and the upsampled low-res image
        self.input_conv = nn.Conv2d(in_ch, C0, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [C0], C0, cfg.image_size
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(c, C0 * mult, res))
                c = C0 * mult
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(EmbedSequential(Downsample(c)))
                skips.append(c)
                res //= 2
        middle = [ResBlock(c, c, emb_dim, cfg.dropout), ResBlock(c, c, emb_dim, cfg.dropout)]
        if res in attn_res:
            middle.insert(1, AttentionBlock(c, cfg.head_channels, ctx_width))
        self.middle = EmbedSequential(*middle)
        # the way up: one more ResBlock per level than on the way down, each eating one skip connection
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                layer = block(c + skips.pop(), C0 * mult, res)
                c = C0 * mult
                if level > 0 and i == cfg.num_res_blocks:
                    layer.append(Upsample(c))
                    res *= 2
                self.up.append(layer)
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.out_channels, 3, padding=1))
        self.init_weights()

    def init_weights(self):
        """The one place the UNet's weights are set. Convolutions and linear layers keep PyTorch's default
        init (as ADM); the text transformer has GPT-2's (transformer.init_weights, run when it is built).
        The output layer of every residual branch starts at zero (ADM's zero_module): each ResBlock and
        attention layer starts as the identity, and the whole UNet starts by predicting exactly 0."""
        residual_outputs = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        residual_outputs += [m.attn.proj for m in self.modules() if isinstance(m, AttentionBlock)]
        for layer in residual_outputs + [self.out[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.cfg.clip_dim:
            nn.init.zeros_(self.null_clip)
        if self.cfg.text_vocab:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.text_pos, std=0.01)
            nn.init.zeros_(self.null_text)

    def encode_text(self, tokens):
        """Caption (B, T) -> encodings (B, T, text_width), real (B, T) (False = padding), pooled (B, text_width).

        The transformer is bidirectional, with padding masked out, so padding changes nothing. The pooled
        features are those of the last real token (the eot, which has seen the whole caption; GLIDE reads
        its last token); a caption with no real token at all gets the learned null_text."""
        B, T = tokens.shape
        if T > self.cfg.text_len:
            raise ValueError(f"{T} caption tokens, but the model's text_len is {self.cfg.text_len}")
        real = tokens != self.cfg.pad_id  # (B, T)
        h = self.token_embedding(tokens) + self.text_pos[:T]  # (B, T, width)
        h = self.text_transformer(h, key_padding_mask=real)  # (B, T, width)
        positions = torch.arange(T, device=tokens.device)
        last = torch.where(real, positions, -1).max(dim=1).values  # (B,) the last real token, -1 if none
        pooled = h[torch.arange(B, device=h.device), last.clamp(min=0)]  # (B, T, width) -> (B, width)
        pooled = torch.where((last >= 0)[:, None], pooled, self.null_text.to(h.dtype))  # (B, width)
        return h, real, pooled

    def forward(self, x, t, clip_emb=None, tokens=None, low_res=None, drop_clip=None, drop_text=None):
        """ε̂ (B, out_channels, H, W) for x_t (B, in_channels, H, W) at steps t (B,).

        clip_emb (B, D): the unit CLIP image embedding, when clip_dim > 0. tokens (B, T ≤ text_len): the caption,
        padded with pad_id, when text_vocab > 0. low_res (B, in_channels, h, w): the image to upsample, when
        low_res. drop_clip / drop_text (B,) bool, True = drop this sample's conditioning, for classifier-free
        guidance (GLIDE §2.3; unCLIP §2.1 drops z_i 10% and the caption 50% of the time): a dropped z_i is
        replaced by the learned null_clip, a dropped caption by an all-pad caption (no context tokens; the
        learned null_text as its pooled features). Sampling without conditioning = dropping every sample.
        """
        cfg = self.cfg
        B, _, H, W = x.shape
        inputs = [("clip_emb", clip_emb, cfg.clip_dim > 0), ("tokens", tokens, cfg.text_vocab > 0),
                  ("low_res", low_res, cfg.low_res)]
        for name, value, wanted in inputs:
            if (value is not None) != wanted:
                raise ValueError(f"this UNet {'needs' if wanted else 'takes no'} {name} (see UNetConfig)")
        if cfg.low_res:
            up = F.interpolate(low_res, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)
            x = torch.cat([x, up], dim=1)  # (B, 2C, H, W)

        emb = self.time_embed(timestep_embedding(t, cfg.base_channels))  # (B, 4·C0)
        context, masks = [], []  # context tokens (B, S_i, text_width) and which are real (B, S_i)
        if cfg.text_vocab:
            if drop_text is not None:
                tokens = tokens.masked_fill(drop_text[:, None], cfg.pad_id)  # a dropped caption: all padding
            text, real, pooled = self.encode_text(tokens)
            emb = emb + self.text_to_emb(pooled)
            context.append(text)
            masks.append(real)
        if cfg.clip_dim:
            clip_emb = clip_emb * cfg.clip_dim ** 0.5  # unit z_i has coordinates ~1/√D: bring them to ~1
            if drop_clip is not None:
                clip_emb = torch.where(drop_clip[:, None], self.null_clip.to(clip_emb.dtype), clip_emb)  # (B, D)
            emb = emb + self.clip_to_emb(clip_emb)
            n, width = cfg.n_clip_tokens, cfg.text_width
            context.append(self.clip_to_tokens(clip_emb).view(B, n, width))  # (B, n·width) -> (B, n, width)
            masks.append(torch.ones(B, n, dtype=torch.bool, device=x.device))  # never padding
        context = torch.cat(context, dim=1) if context else None  # (B, S, width): caption tokens, then CLIP tokens
        context_mask = torch.cat(masks, dim=1) if cfg.text_vocab else None  # (B, S); only captions have padding

        h = self.input_conv(x)  # (B, C0, H, W)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle(h, emb, context, context_mask)
        for layer in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H', W'): the skip of the same scale
            h = layer(h, emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)
