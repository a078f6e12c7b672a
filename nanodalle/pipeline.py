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

from nanodalle import UserError, shapes, train_utils
from nanodalle.clip import load_clip
from nanodalle.dalle import DALLE, DALLEConfig
from nanodalle.dvae import DVAE, DVAEConfig
from nanodalle.tokenizer import Tokenizer


def state_hash(state: dict) -> str:
    """A short fingerprint of a state dict's tensors: which dVAE a transformer's codes came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def load_dvae(path: str, device="cpu") -> tuple[DVAE, str]:
    """A trained dVAE (EMA weights when saved) and its fingerprint."""
    ckpt = train_utils.load_checkpoint(path, "dvae")
    model = train_utils.model_from_checkpoint(ckpt, DVAEConfig, DVAE)
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
        ckpt = train_utils.load_checkpoint(dalle_path, "dalle")
        dalle = train_utils.model_from_checkpoint(ckpt, DALLEConfig, DALLE).to(device)
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
    rerank: the fraction of captions whose CLIP-best candidate does (only with a CLIP)."""
    records = shapes.eval_records(split, n_captions)
    captions, scenes = [c for c, _ in records], [s for _, s in records]
    images, _ = pipe.generate(captions, num=num, seed=seed, **sampling)  # (P, num, 3, H, W), best first
    full = torch.tensor([[shapes.judge(images[p, k], scenes[p])["full"] for k in range(num)]
                         for p in range(len(records))], dtype=torch.float)  # (P, num)
    out = {"single": full.mean().item()}
    if pipe.clip is not None:
        out["rerank"] = full[:, 0].mean().item()
    return out
