"""Stage 1 of unCLIP: train the diffusion prior, caption -> CLIP image embedding (nanodalle/prior.py).

    python train_prior.py                         # toy preset on the built-in shapes, with out/clip
    python train_prior.py --data my_images/ --size small --clip out/clip/ckpt.pt
    torchrun --nproc_per_node 8 train_prior.py --size full --data shards/ --clip ...
    python train_prior.py --size full --dry-run

CLIP is frozen, so the data set is embedded once, before training, and cached next to the output:
OUT/embeddings_train.pt and OUT/embeddings_val.pt hold each image's CLIP embedding and, for every caption
line, its text embedding, per-token features (float16) and length, tagged with CLIP's fingerprint, the
data and --max-images. A later run (or --resume) with the same CLIP and data reuses them; another CLIP
embeds again. (At the full size the token features, 77 × 1024 per caption, make a large cache: ~160 kB a
caption.) The prior's embed_dim, text_len and text_width are CLIP's, whatever the preset says.

Writes OUT/ckpt.pt (with CLIP's tokenizer, and CLIP's path, config and fingerprint under "upstream"),
OUT/log.jsonl and OUT/metrics.json:
  val_mse                 the training loss on up to 2048 val captions, with fixed t and noise
  prior_cosine_to_true    mean cosine between the prior's sample (64 DDIM steps, draw 2 keep 1, the config's
                          guidance) and the true CLIP image embedding, on the first 200 val captions
  text_cosine_to_true     the same for the text embedding itself, and
  mean_cosine_to_true     for the mean training image embedding (ignores the caption): baselines to beat
"""
import os

import torch
import torch.nn.functional as F

from nanodalle import UserError, checkpoint, data, flags, train_utils
from nanodalle.clip import load_clip
from nanodalle.pipeline import state_hash
from nanodalle.prior import PRESETS, DiffusionPrior, PriorConfig

# Training settings per preset. unCLIP App. C, Table 3 (diffusion prior): lr 1.1e-4, Adam β2 0.96, ε 1e-6,
# weight decay 6.0e-2, batch 4096, 600k updates; the toy preset takes larger steps on a 2-core CPU.
TRAIN = {
    "toy": dict(steps=3000, batch_size=32, lr=5e-4, warmup=100, min_lr_frac=0.05, weight_decay=0.06,
                max_images=50_000),
    "small": dict(steps=200_000, batch_size=512, lr=1.1e-4, warmup=2000, weight_decay=0.06),
    "full": dict(steps=600_000, batch_size=16, lr=1.1e-4, warmup=5000, weight_decay=0.06),  # × 256 GPUs = 4096
}
BETAS, EPS = (0.9, 0.96), 1e-6  # unCLIP Table 3
VAL_CAPTIONS, SAMPLE_CAPTIONS = 2048, 200


# ----------------------------------------------------------------------------------------------------
# the embedding cache

def encode_split(clip, spec: str, split: str, clip_hash: str, path: str, max_images, num_workers: int = 0) -> dict:
    """CLIP's image embedding of every image of a split and, for every caption line, its text embedding,
    per-token features and length, cached at `path`. caption_image[i] is the image of caption line i."""
    tag = {"clip_hash": clip_hash, "data": spec, "image_size": clip.cfg.image_size, "max_images": max_images}
    device = clip.logit_scale.device

    def encode(images, lines, first):
        tokens = clip.tokenize([line for ls in lines for line in ls])  # (M, L): every caption line of the batch
        text_emb, feats = clip.encode_text_with_tokens(tokens)  # (M, D), (M, L, text_width)
        return {"image_emb": clip.encode_image(images.to(device)).float(),  # (b, D)
                "text_emb": text_emb.float(),
                "token_feats": feats.to(torch.float16),  # half the disk; LayerNorm'd, O(1) values
                "lengths": (clip.tokenizer.lengths(tokens.cpu()) + 1).to(torch.int16),  # up to the eot
                "caption_image": torch.tensor([first + i for i, ls in enumerate(lines) for _ in ls])}
    return data.cached_split(spec, clip.cfg.image_size, split, max_images, path, tag, encode, "embeddings",
                             num_workers=num_workers)


def get_batch(cache: dict, idx: torch.Tensor):
    """Caption indices (B,) -> (z_i (B, D), z_t (B, D), token features (B, L', W), pad mask (B, L')), cut to
    the longest caption of the batch (L' ≤ L): the rest is padding, which the prior masks out anyway."""
    lengths = cache["lengths"][idx].long()  # (B,)
    L = int(lengths.max())
    pad_mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L'): True up to and including the eot
    feats = cache["token_feats"][idx, :L].float()  # (B, L', W)
    return cache["image_emb"][cache["caption_image"][idx]], cache["text_emb"][idx], feats, pad_mask


def batches(cache: dict, batch_size: int, seed: int):
    """Endless random batches of captions (each with its own image) from an embedding cache."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield get_batch(cache, torch.randint(len(cache["text_emb"]), (batch_size,), generator=g))


# ----------------------------------------------------------------------------------------------------

def main():
    parser = flags.make_parser("prior", __doc__.split("\n")[0], PriorConfig, PRESETS, TRAIN)
    parser.add_argument("--clip", default="out/clip/ckpt.pt", help="the frozen CLIP (default: out/clip/ckpt.pt)")
    parser.add_argument("--max-images", type=int,
                        help="embed at most this many training images (default: toy 50000, else all)")
    args = parser.parse_args()
    cfg = flags.config_from_args(PriorConfig, PRESETS, args)
    flags.check_diffusion(cfg.timesteps, cfg.schedule, "x0")  # the prior predicts x_0 (unCLIP §2.2)
    if args.dry_run:
        return train_utils.dry_run(DiffusionPrior, cfg, args, "prior")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not a multiple of --n-head {cfg.n_head}")

    device = train_utils.pick_device(args.device)
    clip = load_clip(args.clip, device).requires_grad_(False)
    clip_hash = state_hash(clip.state_dict())
    # the embedding size and the text features' shape are facts of CLIP, not choices
    facts = {"embed_dim": clip.cfg.embed_dim, "text_len": clip.cfg.context_length,
             "text_width": clip.cfg.text_width}
    checkpoint.take_facts(cfg, facts, "CLIP", args)

    trainer = train_utils.Trainer(args, "prior", cfg, DiffusionPrior, betas=BETAS, eps=EPS, extra_state={
        "tokenizer": clip.tokenizer.state(),
        "upstream": {"clip": os.path.abspath(args.clip), "clip_hash": clip_hash, "clip_config": vars(clip.cfg)}})
    cfg = trainer.cfg
    checkpoint.check_facts(cfg, facts, f"--clip {args.clip}")

    # --- embed the data once (the master), then every rank reads the cache
    caches = trainer.master_builds(
        {s: os.path.join(trainer.out, f"embeddings_{s}.pt") for s in ("train", "val")},
        lambda split, path: encode_split(clip, args.data, split, clip_hash, path,
                                         args.max_images if split == "train" else VAL_CAPTIONS, args.num_workers))
    train_cache, val_cache = caches["train"], caches["val"]
    del clip  # everything CLIP has to say is in the caches now
    mean_image = train_cache["image_emb"].mean(dim=0).to(trainer.device)  # (D,): the caption-blind guess
    train_batches = batches(train_cache, args.batch_size, args.seed + 1000 * trainer.rank + trainer.step)

    def loss_fn(model, batch, step):
        image_emb, text_emb, feats, pad_mask = batch
        return model(image_emb, text_emb, feats, pad_mask), {}  # captions dropped cond_drop of the time

    def evaluate(step):
        model = trainer.eval_model()  # in eval mode, without gradients (Trainer.run_evaluation)
        g = torch.Generator().manual_seed(0)  # the same t and noise at every evaluation
        n_val = min(len(val_cache["text_emb"]), VAL_CAPTIONS)
        mse = 0.0
        for s in range(0, n_val, 256):
            idx = torch.arange(s, min(s + 256, n_val))
            image_emb, text_emb, feats, pad_mask = trainer.to_device(get_batch(val_cache, idx))
            t = torch.randint(cfg.timesteps, (len(idx),), generator=g).to(trainer.device)
            noise = torch.randn(image_emb.shape, generator=g).to(trainer.device)
            with train_utils.autocast(trainer.device, trainer.dtype):
                mse += model(image_emb, text_emb, feats, pad_mask, t=t, noise=noise).item() * len(idx)
        # the first 200 val captions: sampled z_i against the true one, and z_t itself as the baseline
        idx = torch.arange(min(len(val_cache["text_emb"]), SAMPLE_CAPTIONS))
        image_emb, text_emb, feats, pad_mask = trainer.to_device(get_batch(val_cache, idx))
        gen = torch.Generator(trainer.device).manual_seed(0)  # the same noise at every evaluation too
        with train_utils.autocast(trainer.device, trainer.dtype):
            sampled = model.sample(text_emb, feats, pad_mask, steps=cfg.sample_steps, generator=gen)  # (n, D)
        return {"val_mse": mse / n_val,
                "prior_cosine_to_true": F.cosine_similarity(sampled.float(), image_emb).mean().item(),
                "text_cosine_to_true": F.cosine_similarity(text_emb, image_emb).mean().item(),
                "mean_cosine_to_true": F.cosine_similarity(mean_image[None], image_emb).mean().item()}

    trainer.fit(train_batches, loss_fn, evaluate)


if __name__ == "__main__":
    train_utils.main(main)
