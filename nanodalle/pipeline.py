"""Load trained checkpoints by stage and run a pipeline end to end (used by sample.py and the evaluations).

DALL-E 1 (Ramesh et al. 2021, §2.3 and §2.6):

    captions --tokenizer--> (P, L) --transformer, `num` samples each--> (P·num, N) codes
             --dVAE decoder--> (P·num, 3, H, W) images --CLIP: cosine to the caption--> best first

Reranking is the paper's "language-guided search": sample many candidates, keep those CLIP scores highest
(§2.6: 512 candidates per caption; the toy demo uses 8).
"""
import hashlib

import torch
import torch.nn.functional as F

from nanodalle import UserError, checkpoint, shapes
from nanodalle.clip import load_clip
from nanodalle.dalle import DALLE, DALLEConfig
from nanodalle.diffusion import GaussianDiffusion, guided_batched
from nanodalle.dvae import DVAE, DVAEConfig
from nanodalle.tokenizer import Tokenizer
from nanodalle.unet import UNet, UNetConfig


def state_hash(state: dict) -> str:
    """A short fingerprint of a state dict's tensors: which dVAE a transformer's codes came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def load_dvae(path: str, device="cpu") -> tuple[DVAE, str]:
    """A trained dVAE (EMA weights when saved) and its fingerprint."""
    ckpt = checkpoint.load_checkpoint(path, "dvae")
    model = checkpoint.model_from_checkpoint(ckpt, DVAEConfig, DVAE)
    return model.to(device), state_hash(model.state_dict())


def check_dvae(dalle_cfg: DALLEConfig, upstream: dict, dvae: DVAE, dvae_hash: str, dvae_path: str) -> None:
    """The transformer reads and writes the codes of one dVAE: its grid and codebook must match."""
    d = dvae.cfg
    if (d.grid_size, d.vocab_size) != (dalle_cfg.grid_size, dalle_cfg.image_vocab):
        raise UserError(f"{dvae_path} has a {d.grid_size}×{d.grid_size} grid of {d.vocab_size} codes, but the "
                        f"transformer was trained on a {dalle_cfg.grid_size}×{dalle_cfg.grid_size} grid of "
                        f"{dalle_cfg.image_vocab} codes: pass the dVAE it was trained with (--dvae)")
    if upstream.get("dvae_hash") not in (None, dvae_hash):
        print(f"warning: {dvae_path} is not the dVAE the transformer was trained with (weights differ: "
              f"{dvae_hash} vs {upstream['dvae_hash']}); images may not match their captions")


class DALLE1:
    """The DALL-E 1 pipeline: transformer + dVAE decoder, and CLIP for reranking when given."""

    def __init__(self, dalle: DALLE, tokenizer: Tokenizer, dvae: DVAE, clip=None):
        self.dalle, self.tokenizer, self.dvae, self.clip = dalle.eval(), tokenizer, dvae.eval(), clip

    @classmethod
    def from_checkpoints(cls, dalle_path: str, dvae_path: str, clip_path: str | None = None, device="cpu"):
        ckpt = checkpoint.load_checkpoint(dalle_path, "dalle")
        dalle = checkpoint.model_from_checkpoint(ckpt, DALLEConfig, DALLE).to(device)
        dvae, dvae_hash = load_dvae(dvae_path, device)
        check_dvae(dalle.cfg, ckpt.get("upstream", {}), dvae, dvae_hash, dvae_path)
        clip = load_clip(clip_path, device) if clip_path else None
        return cls(dalle, Tokenizer.from_state(ckpt["tokenizer"]), dvae, clip)

    @property
    def device(self):
        return self.dalle.bos.device

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if not c.strip():
                raise UserError("an empty prompt: give a caption to draw, e.g. --prompt \"a small red circle\"")
        return self.tokenizer.encode_batch(captions, self.dalle.cfg.text_len).to(self.device)  # (P, L)

    @torch.no_grad()
    def generate(self, captions: list[str], num: int = 8, seed: int = 0, prompt_images=None, prompt_rows: int = 0,
                 batch_size: int = 256, progress: bool = False, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """`num` images per caption, best first when there is a CLIP: (P, num, 3, H, W) in [-1, 1] and
        (P, num) CLIP scores (zeros without CLIP, in sampling order).

        prompt_images (P, 3, H, W): keep the top `prompt_rows` rows of codes of each and complete the rest (§3.3).
        sampling: temperature, top_k, top_p, cond_scale (see DALLE.generate). Deterministic under `seed`.
        """
        P, g = len(captions), self.dalle.cfg.grid_size
        text = self.encode_captions(captions).repeat_interleave(num, dim=0)  # (P·num, L): num rows per caption
        prompt = None
        if prompt_images is not None and prompt_rows > 0:
            codes = self.dvae.encode(prompt_images.to(self.device))  # (P, h, w)
            prompt = codes.flatten(1)[:, :prompt_rows * g].repeat_interleave(num, dim=0)  # (P·num, rows·w)
        generator = torch.Generator(self.device).manual_seed(seed)
        codes = []
        for i in range(0, len(text), batch_size):
            chunk_prompt = None if prompt is None else prompt[i:i + batch_size]
            codes.append(self.dalle.generate(text[i:i + batch_size], chunk_prompt, generator=generator,
                                             progress=progress, **sampling))
        codes = torch.cat(codes).view(-1, g, g)  # (P·num, h, w)
        images = torch.cat([self.dvae.decode(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size)])
        images = images.float().view(P, num, *images.shape[1:])  # (P, num, 3, H, W)
        scores = torch.zeros(P, num)
        if self.clip is not None:
            for p in range(P):
                scores[p] = clip_scores(self.clip, images[p], captions[p]).cpu()
            order = scores.argsort(dim=1, descending=True)  # (P, num)
            images = torch.stack([images[p, order[p]] for p in range(P)])
            scores = scores.gather(1, order)
        return images, scores


def add_dalle1_sampling_args(parser) -> None:
    """The flags of DALL-E 1 sampling (sample.py, evaluate.py); check_dalle1_sampling reads them."""
    parser.add_argument("--temperature", type=float,
                        help="(default: the model's, saved with it: toy 0.5, small and full 1 as in the paper)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely codes only (default: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of codes with this mass")
    parser.add_argument("--cond-scale", type=float, default=1.0,
                        help="classifier-free guidance scale: 1 = off (default), 2-4 follow the caption more")


def check_dalle1_sampling(args) -> dict:
    """A one-line UserError for an impossible setting, else the kwargs of DALLE1.generate."""
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be ≥ 0 (0 = always the most likely code)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be ≥ 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale)


def clip_scores(clip, images: torch.Tensor, caption: str) -> torch.Tensor:
    """(N,) cosine similarity of each image to the caption, images resized to CLIP's input size if needed."""
    size = clip.cfg.image_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return clip.rank(images.to(clip.logit_scale.device), caption)


@torch.no_grad()
def judge_dalle1(pipe: DALLE1, split: str, n_captions: int = 200, num: int = 8, seed: int = 0, **sampling) -> dict:
    """Score generated images with the shapes judge on the first n captions of a shapes split.

    single: the fraction of all candidates that show their caption (the accuracy of one sample);
    rerank: the fraction of captions whose CLIP-best candidate does (only with a CLIP);
    clip_score_single / clip_score_rerank: 100 × the mean CLIP cosine of all candidates / of the best."""
    records = shapes.eval_records(split, n_captions)
    captions, scenes = [c for c, _ in records], [s for _, s in records]
    images, scores = pipe.generate(captions, num=num, seed=seed, **sampling)  # (P, num, 3, H, W), best first
    full = torch.tensor([[shapes.judge(images[p, k], scenes[p])["full"] for k in range(num)]
                         for p in range(len(records))], dtype=torch.float)  # (P, num)
    out = {"single": full.mean().item()}
    if pipe.clip is not None:
        out["rerank"] = full[:, 0].mean().item()
        out["clip_score_single"], out["clip_score_rerank"] = 100 * scores.mean().item(), 100 * scores[:, 0].mean().item()
    return out


# ----------------------------------------------------------------------------------------------------
# DALL-E 2 / unCLIP (Ramesh et al. 2022, §2 and §3):
#
#     caption --CLIP text encoder--> z_t, token features --prior--> z_i (a CLIP image embedding)
#             --decoder UNet, DDIM or DDPM, guided by z_i and the caption--> 32 px (paper: 64)
#             --upsampler UNet, conditioned on that image--> 64 px (paper: 256, then 1024)
#
# Because the decoder reads a CLIP image embedding, any image can be turned into one (CLIP's image encoder)
# and decoded again: variations, interpolations and text diffs (§3) are all walks in that space.

def clip_image_embedding(clip, images: torch.Tensor) -> torch.Tensor:
    """(B, D) unit CLIP image embeddings of (B, 3, H, W) images in [-1, 1], resized to CLIP's input size."""
    size = clip.cfg.image_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return clip.encode_image(images.to(clip.logit_scale.device)).float()


def clip_text_inputs(clip, captions: list[str]):
    """What the prior reads of each caption: z_t (B, D), token features (B, L, W) and the mask of real tokens
    (B, L), True up to and including the eot (train_prior.py caches the same three)."""
    tokens = clip.tokenize(captions)  # (B, L)
    text_emb, feats = clip.encode_text_with_tokens(tokens)
    lengths = clip.tokenizer.lengths(tokens.cpu()).to(tokens.device) + 1  # (B,) real tokens incl. the eot
    pad_mask = torch.arange(tokens.size(1), device=tokens.device)[None, :] < lengths[:, None]
    return text_emb.float(), feats.float(), pad_mask


def slerp(a: torch.Tensor, b: torch.Tensor, frac: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors (B, D): the path unCLIP §3.2 walks between two images'
    embeddings, which stays on the sphere where CLIP embeddings live (a straight line would cut inside)."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # (B, 1) the angle
    return (torch.sin((1 - frac) * omega) * a + torch.sin(frac * omega) * b) / torch.sin(omega)


def make_diffusion(cfg) -> GaussianDiffusion:
    """The decoder's / upsampler's Gaussian diffusion, from the settings saved with the UNet."""
    return GaussianDiffusion(cfg.timesteps, cfg.schedule, predict=cfg.predict, shift=cfg.schedule_shift)


def decoder_model_fn(unet: UNet, clip_emb, tokens, guidance_scale: float):
    """model_fn(x_t, t) -> ε̂ for the decoder, guided (GLIDE §2.4, unCLIP §2.1) by dropping z_i and the caption
    together for the unconditional half. clip_emb None: z_i is dropped everywhere (GLIDE-style, caption only);
    tokens None: the caption is (variations and interpolations of images have none)."""
    cfg, B = unet.cfg, (clip_emb if clip_emb is not None else tokens).size(0)
    device = next(unet.parameters()).device
    drop_clip = torch.full((B,), clip_emb is None, device=device)  # True: null_clip stands in for z_i
    drop_text = torch.full((B,), tokens is None, device=device)    # True: an all-pad caption
    if clip_emb is None:
        clip_emb = torch.zeros(B, cfg.clip_dim, device=device)
    if tokens is None:
        tokens = torch.full((B, 1), cfg.pad_id, dtype=torch.long, device=device)
    if guidance_scale == 1:
        return lambda x_t, t: unet(x_t, t, clip_emb, tokens, drop_clip=drop_clip, drop_text=drop_text).float()
    drop_all = torch.ones(B, dtype=torch.bool, device=device)
    clip2, tokens2 = torch.cat([clip_emb, clip_emb]), torch.cat([tokens, tokens])  # [cond; uncond]
    drop_clip2, drop_text2 = torch.cat([drop_clip, drop_all]), torch.cat([drop_text, drop_all])
    return guided_batched(lambda x_t, t: unet(x_t, t, clip2, tokens2, drop_clip=drop_clip2,
                                              drop_text=drop_text2).float(), guidance_scale)


@torch.no_grad()
def upsample_images(upsampler: UNet, diffusion: GaussianDiffusion, images: torch.Tensor, steps=None, generator=None,
                    progress: bool = False) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, H, W): DDIM (the upsampler's own steps) conditioned on the low-res images."""
    cfg, low = upsampler.cfg, images.clamp(-1, 1)
    shape = (images.size(0), cfg.out_channels, cfg.image_size, cfg.image_size)
    return diffusion.ddim_sample(lambda x_t, t: upsampler(x_t, t, low_res=low).float(), shape,
                                 steps or cfg.sample_steps, generator=generator, clip_x0=1.0, progress=progress)


class DALLE2:
    """The unCLIP pipeline: CLIP, the prior (optional: --no-prior), the decoder, and the upsampler (optional)."""

    def __init__(self, clip, decoder: UNet, tokenizer: Tokenizer, prior=None, upsampler: UNet | None = None):
        self.clip, self.decoder, self.tokenizer = clip.eval(), decoder.eval(), tokenizer
        self.prior = prior.eval() if prior is not None else None
        self.upsampler = upsampler.eval() if upsampler is not None else None
        device = next(decoder.parameters()).device
        self.decoder_diffusion = make_diffusion(decoder.cfg).to(device)
        self.upsampler_diffusion = make_diffusion(upsampler.cfg).to(device) if upsampler is not None else None

    @classmethod
    def from_checkpoints(cls, clip_path: str, decoder_path: str, prior_path: str | None = None,
                         upsampler_path: str | None = None, device="cpu"):
        from nanodalle.prior import DiffusionPrior, PriorConfig
        clip = load_clip(clip_path, device)
        ckpt = checkpoint.load_checkpoint(decoder_path, "decoder")
        decoder = checkpoint.model_from_checkpoint(ckpt, UNetConfig, UNet).to(device)
        if decoder.cfg.clip_dim != clip.cfg.embed_dim:
            raise UserError(f"{decoder_path} reads {decoder.cfg.clip_dim}-d CLIP embeddings but {clip_path} makes "
                            f"{clip.cfg.embed_dim}-d ones: pass the CLIP the decoder was trained with (--clip)")
        prior = None
        if prior_path is not None:
            prior_ckpt = checkpoint.load_checkpoint(prior_path, "prior")
            prior = checkpoint.model_from_checkpoint(prior_ckpt, PriorConfig, DiffusionPrior).to(device)
            if prior.cfg.embed_dim != clip.cfg.embed_dim:
                raise UserError(f"{prior_path} makes {prior.cfg.embed_dim}-d embeddings but {clip_path} has "
                                f"{clip.cfg.embed_dim}-d ones: pass the CLIP the prior was trained with (--clip)")
        upsampler = None
        if upsampler_path is not None:
            up_ckpt = checkpoint.load_checkpoint(upsampler_path, "upsampler")
            upsampler = checkpoint.model_from_checkpoint(up_ckpt, UNetConfig, UNet).to(device)
            if upsampler.cfg.low_res_size != decoder.cfg.image_size:
                raise UserError(f"{upsampler_path} upsamples {upsampler.cfg.low_res_size} px images but the decoder "
                                f"makes {decoder.cfg.image_size} px ones: pass a matching --upsampler (or none)")
        return cls(clip, decoder, Tokenizer.from_state(ckpt["tokenizer"]), prior, upsampler)

    @property
    def device(self):
        return next(self.decoder.parameters()).device

    def decoder_tokens(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if not c.strip():
                raise UserError("an empty prompt: give a caption to draw, e.g. --prompt \"a small red circle\"")
        return self.tokenizer.encode_batch(captions, self.decoder.cfg.text_len).to(self.device)  # (B, T)

    @torch.no_grad()
    def prior_embeddings(self, captions: list[str], generator=None, steps=None, guidance_scale=None) -> torch.Tensor:
        """(B, D) CLIP image embeddings sampled by the prior for B captions (draw 2, keep the closer to z_t)."""
        if self.prior is None:
            raise UserError("no prior loaded: pass --prior PATH, or --no-prior to decode from the caption alone")
        text_emb, feats, pad_mask = clip_text_inputs(self.clip, captions)
        return self.prior.sample(text_emb, feats, pad_mask, steps=steps, guidance_scale=guidance_scale,
                                 generator=generator).float()

    @torch.no_grad()
    def decode(self, clip_emb=None, tokens=None, noise=None, steps=None, eta: float = 0.0, guidance_scale=None,
               sampler: str = "ddim", generator=None, progress: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from z_i (B, D) and / or caption tokens (B, T), from noise x_T (B, 3, H, W)
        when given (variations start from a DDIM-inverted one). sampler "ddim" (steps, eta) or "ddpm" (all T)."""
        cfg = self.decoder.cfg
        B = (clip_emb if clip_emb is not None else tokens).size(0)
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        model_fn = decoder_model_fn(self.decoder, clip_emb, tokens, scale)
        shape = (B, cfg.out_channels, cfg.image_size, cfg.image_size)
        if sampler == "ddpm":
            return self.decoder_diffusion.ddpm_sample(model_fn, shape, noise=noise, generator=generator, clip_x0=1.0,
                                                      progress=progress)
        return self.decoder_diffusion.ddim_sample(model_fn, shape, steps or cfg.sample_steps, eta=eta, noise=noise,
                                                  generator=generator, clip_x0=1.0, progress=progress)

    def upsample(self, images: torch.Tensor, steps=None, generator=None, progress: bool = False) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 3, H, W) with the upsampler; unchanged without one."""
        if self.upsampler is None:
            return images
        return upsample_images(self.upsampler, self.upsampler_diffusion, images, steps, generator, progress)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, clip_emb: torch.Tensor, steps=None) -> torch.Tensor:
        """x_T (B, 3, H, W) that DDIM (η = 0) decodes back to `images` given z_i: the image's "bipartite latent"
        (z_i, x_T) of unCLIP §3. Unguided: inversion follows the conditional model alone."""
        size = self.decoder.cfg.image_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        model_fn = decoder_model_fn(self.decoder, clip_emb, None, 1.0)
        return self.decoder_diffusion.ddim_invert(model_fn, images.to(self.device),
                                                  steps or self.decoder.cfg.sample_steps, clip_x0=1.0)

    @torch.no_grad()
    def generate(self, captions: list[str], num: int = 4, seed: int = 0, use_prior: bool = True, steps=None,
                 eta: float = 0.0, guidance_scale=None, sampler: str = "ddim", upsample: bool = True,
                 progress: bool = False) -> torch.Tensor:
        """`num` images per caption: (P, num, 3, H, W) in [-1, 1]. Deterministic under `seed`."""
        P = len(captions)
        tokens = self.decoder_tokens(captions).repeat_interleave(num, dim=0)  # (P·num, T)
        generator = torch.Generator(self.device).manual_seed(seed)
        clip_emb = None
        if use_prior:
            clip_emb = self.prior_embeddings([c for c in captions for _ in range(num)], generator)  # (P·num, D)
        images = self.decode(clip_emb, tokens, steps=steps, eta=eta, guidance_scale=guidance_scale,
                             sampler=sampler, generator=generator, progress=progress)
        if upsample:
            images = self.upsample(images, generator=generator, progress=progress)
        return images.float().view(P, num, *images.shape[1:])


@torch.no_grad()
def judge_dalle2(pipe: DALLE2, split: str, n_captions: int = 200, seed: int = 0, batch_size: int = 100,
                 **sampling) -> dict:
    """The shapes judge's full-match accuracy of one DALL-E 2 sample per caption (the first n captions of a
    shapes split), the cosine between the prior's z_i and the true image's CLIP embedding, and the CLIP score
    of the samples (100 × the mean cosine between CLIP's embeddings of each image and its caption)."""
    from nanodalle.shapes import ShapesDataset, judge
    dataset = ShapesDataset(split, pipe.decoder.cfg.image_size)
    full, cosines, scores = [], [], []
    for s in range(0, n_captions, batch_size):
        ids = range(s, min(s + batch_size, n_captions))
        images, captions = zip(*(dataset[i] for i in ids))
        truth = clip_image_embedding(pipe.clip, torch.stack(images))  # (b, D) the true images' z_i
        generator = torch.Generator(pipe.device).manual_seed(seed + s)
        clip_emb = pipe.prior_embeddings(list(captions), generator)  # (b, D)
        cosines.append(F.cosine_similarity(clip_emb, truth).cpu())
        out = pipe.decode(clip_emb, pipe.decoder_tokens(list(captions)), generator=generator, **sampling)
        full += [judge(out[k], dataset.scene(i))["full"] for k, i in enumerate(ids)]
        text = pipe.clip.encode_text(pipe.clip.tokenize(list(captions)))  # (b, D), unit
        scores.append((clip_image_embedding(pipe.clip, out) * text).sum(-1).cpu())  # (b,) cosines
    return {"judge": sum(full) / len(full), "prior_cosine_to_true": torch.cat(cosines).mean().item(),
            "clip_score": 100 * torch.cat(scores).mean().item()}
