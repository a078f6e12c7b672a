"""CLIP: contrastive language-image pre-training (Radford et al. 2021).

Two encoders map an image and a caption into the same D-dimensional space, trained so that the N true
(image, caption) pairs of a batch score higher than the N² − N wrong ones (CLIP §2.3, Figure 3):

    images (B, 3, H, W) --ViT--> (B, D) --L2 norm--> I ─┐
                                                        ├─ logits = 1/τ · I @ Tᵀ (B, B) -> cross-entropy over
    tokens (B, T) --causal transformer, read at eot--> T┘    rows (image -> text) and columns (text -> image)

The temperature τ is learned as logit_scale = log(1/τ), starting at 1/τ = 1/0.07, with 1/τ clipped at 100 (§2.5).

DALL-E 1 uses a trained CLIP to rerank its samples (`rank`); unCLIP's prior and decoder live in its
embedding space (`encode_text`, `encode_image`). Both encoders are nanodalle.transformer.Transformer.
The layout follows openai/CLIP's model.py (VisionTransformer, encode_text), so the `full` preset has
ViT-L/14's 427.6M parameters. Shapes: B batch, T tokens, C width, D embedding, H W image, p patch size.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodalle import UserError, checkpoint
from nanodalle.tokenizer import Tokenizer, eot_positions
from nanodalle.transformer import Transformer

MAX_LOGIT_SCALE = 100.0  # CLIP §2.5: the temperature is clipped so logits are scaled by at most 100


@dataclass
class CLIPConfig:
    image_size: int = 32
    patch_size: int = 8         # the image is cut into (image_size / patch_size)² patches, one token each
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 20    # text positions (OpenAI CLIP: 77; the longest shapes caption is 19 with eot)
    vocab_size: int = 4098      # the shipped tokenizer's; train_clip.py sets it from the tokenizer in use
    eot_id: int = 4096          # the end-of-text id: the text features are read at this token
    embed_dim: int = 128        # D, the joint embedding space


PRESETS = {
    # 32 px, 4×4 patches of 8 px: trains on a 2-core CPU in ~8 minutes on the built-in shapes. The text
    # encoder is narrow (its ~40 words are easy) so the steps go to the image encoder: small shapes are hard.
    "toy": dict(image_size=32, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                text_width=64, text_layers=2, text_heads=2, context_length=20, embed_dim=128),
    # 64 px, 8×8 patches of 8 px, ViT-B-like width at half depth: one GPU, hours
    "small": dict(image_size=64, patch_size=8, vision_width=512, vision_layers=8, vision_heads=8,
                  text_width=512, text_layers=8, text_heads=8, context_length=77, embed_dim=512),
    # ViT-L/14 at 224 px (open_clip's table: 427.6M parameters), OpenAI's BPE vocabulary
    "full": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                 text_width=768, text_layers=12, text_heads=12, context_length=77, vocab_size=49408,
                 eot_id=49407, embed_dim=768),
    # unCLIP App. C: ViT-H/16 at 256 px, image width 1280 × 32 blocks, text width 1024 × 24 blocks
    "unclip": dict(image_size=256, patch_size=16, vision_width=1280, vision_layers=32, vision_heads=16,
                   text_width=1024, text_layers=24, text_heads=16, context_length=77, vocab_size=49408,
                   eot_id=49407, embed_dim=1024),
}


def contrastive_loss(image_features, text_features, logit_scale, negative_features=None):
    """Symmetric InfoNCE of N pairs (CLIP Figure 3): features (N, D), L2-normalised, row i of both is pair i.

    A function, not a method, so a training script can pass features gathered from every DDP rank.
    logit_scale is the learnable log of the inverse temperature; exp(logit_scale) is clipped at 100 (§2.5).
    negative_features (M, D): captions that match no image (hard negatives, NegCLIP §5), appended to the N
    captions each image chooses among; the captions' side of the loss is unchanged.
    """
    # In float32 even under bf16 autocast (which would cast the inputs of @ back down): with 1/τ up to 100, bf16's
    # 8-bit mantissa puts up to ~0.4 of rounding on each logit.
    device = image_features.device.type
    no_autocast = contextlib.nullcontext()  # "meta" (the dry runs' memory estimate) has no autocast to switch off
    if device != "meta":
        no_autocast = torch.autocast(device, enabled=False)
    with no_autocast:
        image_features, text_features = image_features.float(), text_features.float()
        scale = clipped_scale(logit_scale.float())
        logits = scale * image_features @ text_features.t()  # (N, N): image i · caption j
        logits_i = logits
        if negative_features is not None:
            negatives = scale * image_features @ negative_features.float().t()  # (N, M): image i · negative j
            logits_i = torch.cat([logits, negatives], dim=1)  # (N, N + M)
    labels = torch.arange(logits.size(0), device=logits.device)  # the right answer of row i and column i is i
    loss_i = F.cross_entropy(logits_i, labels)  # each image: which of the N (+ M) captions is its own?
    loss_t = F.cross_entropy(logits.t(), labels)  # each caption: which of the N images is its own?
    return (loss_i + loss_t) / 2


def clipped_scale(logit_scale):
    """1/τ = exp(logit_scale), at most 100 (CLIP §2.5). Past the clip the gradient is 0: it cannot run away."""
    return logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


class ImageEncoder(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as in CLIP §2.4: patches -> ln_pre -> transformer -> class token -> D."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        C, p = cfg.vision_width, cfg.patch_size
        n_patches = (cfg.image_size // p) ** 2
        self.patch_embed = nn.Conv2d(3, C, kernel_size=p, stride=p, bias=False)  # one linear map per patch
        self.class_embedding = nn.Parameter(torch.empty(C))  # an extra token whose output sums up the image
        self.pos_embedding = nn.Parameter(torch.empty(n_patches + 1, C))
        self.ln_pre = nn.LayerNorm(C)  # CLIP adds a LayerNorm before the transformer (§2.4)
        self.transformer = Transformer(cfg.vision_layers, C, cfg.vision_heads)  # its ln_f is CLIP's ln_post
        self.proj = nn.Linear(C, cfg.embed_dim, bias=False)

    def forward(self, images):
        B = images.size(0)
        x = self.patch_embed(images)  # (B, 3, H, W) -> (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h·w, C): one token per patch, row by row
        cls = self.class_embedding.expand(B, 1, -1)  # (C,) -> (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, 1 + h·w, C)
        x = self.transformer(self.ln_pre(x))  # (B, 1 + h·w, C): no mask, every patch sees every patch
        return self.proj(x[:, 0])  # (B, C) -> (B, D): the class token's features (after ln_post)


class TextEncoder(nn.Module):
    """A causal transformer over BPE tokens, read at the end-of-text token (CLIP §2.4)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        C = cfg.text_width
        self.eot_id, self.context_length = cfg.eot_id, cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, C)
        self.pos_embedding = nn.Parameter(torch.empty(cfg.context_length, C))
        self.transformer = Transformer(cfg.text_layers, C, cfg.text_heads)  # its ln_f is CLIP's ln_final
        self.proj = nn.Linear(C, cfg.embed_dim, bias=False)

    def features(self, tokens):
        """(B, T) tokens -> (B, T, C) per-token features of the last layer (after ln_final)."""
        B, T = tokens.shape
        if T > self.context_length:
            raise ValueError(f"{T} text tokens, but the model's context_length is {self.context_length}")
        x = self.token_embedding(tokens) + self.pos_embedding[:T]  # (B, T, C)
        # Causal, as in CLIP: the eot token sees the whole caption and nothing after it, so padding
        # never changes the features (and the text encoder could be a language model, §2.4).
        return self.transformer(x, causal=True)  # (B, T, C)

    def project(self, tokens, features):
        """The caption's (B, D) embedding: the features (B, T, C) at each caption's eot token, projected."""
        eot = eot_positions(tokens, self.eot_id)  # (B,)
        x = features[torch.arange(tokens.size(0), device=features.device), eot]  # (B, T, C) -> (B, C)
        return self.proj(x)  # (B, D)

    def forward(self, tokens):
        return self.project(tokens, self.features(tokens))  # (B, D)


def _scalar_logit_scale(module, state_dict, prefix, *args):
    """Checkpoints written before logit_scale became (1,) hold it as a 0-d tensor: reshape it on load."""
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class CLIP(nn.Module):
    """encode_image / encode_text -> unit vectors; forward -> loss; zero_shot_classify and rank take strings.

    `model.tokenizer` (a nanodalle Tokenizer) is a plain attribute, not part of the state dict: whoever
    builds the model sets it (train_clip.py, load_clip) so the string methods can tokenize.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.empty(1))  # log(1/τ), learned (§2.5); (1,): FSDP shards no 0-d tensor
        self.tokenizer = None
        self.init_weights()
        self.register_load_state_dict_pre_hook(_scalar_logit_scale)


    def init_weights(self):
        """The one place CLIP's weights are set. Transformer blocks: GPT-2 init (transformer.init_weights,
        run when each Transformer is built). Embeddings and projections: as OpenAI CLIP's initialize_parameters."""
        for enc in (self.image_encoder, self.text_encoder):
            nn.init.normal_(enc.proj.weight, std=enc.proj.in_features ** -0.5)
        v = self.image_encoder
        width, fan_in = v.class_embedding.numel(), v.patch_embed.weight[0].numel()  # fan_in = 3·p·p
        nn.init.normal_(v.patch_embed.weight, std=fan_in ** -0.5)  # keeps the scale of a patch's pixels
        nn.init.normal_(v.class_embedding, std=width ** -0.5)
        nn.init.normal_(v.pos_embedding, std=width ** -0.5)
        nn.init.normal_(self.text_encoder.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_encoder.pos_embedding, std=0.01)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))  # CLIP §2.5: τ starts at 0.07

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clipped at 100: the inverse temperature the loss actually uses."""
        return clipped_scale(self.logit_scale)

    def encode_image(self, images):
        return F.normalize(self.image_encoder(images), dim=-1)  # (B, D), unit length

    def encode_text(self, tokens):
        return F.normalize(self.text_encoder(tokens), dim=-1)  # (B, D), unit length

    def encode_text_with_tokens(self, tokens):
        """In one pass: the unit (B, D) text embedding and the (B, T, text_width) per-token features of the
        text encoder's last layer (after ln_final), which unCLIP's prior reads as "encoded text" (§2.2)."""
        features = self.text_encoder.features(tokens)  # (B, T, C)
        return F.normalize(self.text_encoder.project(tokens, features), dim=-1), features

    def forward(self, images, tokens, gather=None, negative_tokens=None):
        """The contrastive loss of a batch of pairs, and of hard-negative captions when given (M, T).
        `gather` (DDP): a function mapping the local features to those of the global batch, e.g.
        train_clip.gather_features."""
        features = [self.encode_image(images), self.encode_text(tokens)]
        if negative_tokens is not None:
            features.append(self.encode_text(negative_tokens))
        if gather is not None:
            features = gather(*features)
        negative_features = features[2] if negative_tokens is not None else None
        return contrastive_loss(features[0], features[1], self.logit_scale, negative_features)

    # --- using a trained model: strings in, tokenized with self.tokenizer ---------------------------

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("model.tokenizer is not set: build the model with load_clip(), or set it")
        return self.tokenizer.encode_batch(texts, self.cfg.context_length).to(self.logit_scale.device)

    @torch.no_grad()
    def zero_shot_classify(self, images, class_prompts) -> torch.Tensor:
        """(B,) index of the class whose prompts match each image best (CLIP §3.1.2: zero-shot transfer).

        An entry of class_prompts is one prompt, or a list of prompts (an ensemble, §3.1.4) scored by the mean
        of their probabilities under the softmax over all prompts: for "a small red star on the left", "a large
        red star at the top"... the class "star" collects what the model believes of every caption naming it.
        (CLIP averages the embeddings instead, to cache one vector per class; that assumes the text embedding
        is linear in the words, which a small model's is not.)
        """
        groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
        text = self.encode_text(self.tokenize([p for g in groups for p in g]))  # (P, D), all prompts
        logits = self.scale() * self.encode_image(images) @ text.t()  # (B, P)
        scores, start = [], 0
        for g in groups:  # log of the class's mean probability, up to the softmax's normaliser (shared by all)
            scores.append(torch.logsumexp(logits[:, start:start + len(g)], dim=1) - math.log(len(g)))
            start += len(g)
        return torch.stack(scores, dim=1).argmax(dim=1)  # (B, K) -> (B,)

    @torch.no_grad()
    def rank(self, images, caption: str) -> torch.Tensor:
        """(N,) cosine similarity of each of N candidate images to one caption: DALL-E reranks its samples
        by this and keeps the best (DALL-E §2.6). Sort descending for the best first."""
        text = self.encode_text(self.tokenize([caption]))  # (1, D)
        return (self.encode_image(images) @ text.t()).squeeze(1)  # (N, 1) -> (N,)


def load_clip(path: str, device="cpu") -> CLIP:
    """A trained CLIP (EMA weights when saved) with its tokenizer, from a train_clip.py checkpoint."""
    ckpt = checkpoint.load_checkpoint(path, "clip")
    model = checkpoint.model_from_checkpoint(ckpt, CLIPConfig, CLIP)
    tokenizer = Tokenizer.from_state(ckpt["tokenizer"])
    if (tokenizer.vocab_size, tokenizer.eot_id) != (model.cfg.vocab_size, model.cfg.eot_id):
        raise UserError(f"{path}: the saved tokenizer (vocab {tokenizer.vocab_size}, eot {tokenizer.eot_id}) does "
                        f"not match the model (vocab {model.cfg.vocab_size}, eot {model.cfg.eot_id})")
    model.tokenizer = tokenizer
    return model.to(device)
