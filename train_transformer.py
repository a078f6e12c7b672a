"""Stage 2 of DALL-E: train the transformer over [caption tokens; image codes] (nanodalle/dalle.py).

    python train_transformer.py                   # toy preset on the built-in shapes, with out/dvae and out/clip
    python train_transformer.py --data my_images/ --size small --dvae out/dvae/ckpt.pt
    torchrun --nproc_per_node 8 train_transformer.py --size full --data shards/ --dvae ... --clip ...
    python train_transformer.py --size full --dry-run

The dVAE is frozen (§2.2: the transformer is trained on its argmax codes), so every image is encoded once,
before training, and cached next to the output (data.cached_split): OUT/codes_train.pt and OUT/codes_val.pt
hold the codes (n, h·w) and every caption line of each image, tagged with the dVAE's fingerprint, the data
and the image size. A later run (or --resume) with the same dVAE and data reuses them; another dVAE
re-encodes.

Writes OUT/ckpt.pt (with the tokenizer, and the dVAE's config and fingerprint under "upstream"),
OUT/log.jsonl, OUT/samples.png and OUT/metrics.json:
  val_loss, val_text_loss, val_image_loss     on up to 2048 cached val images
  judge_single, judge_top1_rerank8            (--data shapes) the first 200 "val" captions (attribute pairs
  judge_heldout_single, judge_heldout_rerank8 seen in training) and "heldout" ones (never seen), 8 samples
                                              each; single = fraction of all samples the judge passes,
                                              rerank8 = of the CLIP-best of the 8 (needs --clip)
"""
import os

import torch

from nanodalle import UserError, checkpoint, data, flags, train_utils
from nanodalle.clip import load_clip
from nanodalle.dalle import DALLE, DALLEConfig, PRESETS, drop_captions
from nanodalle.pipeline import DALLE1, judge_dalle1, load_dvae
from nanodalle.tokenizer import Tokenizer

# Training settings per preset. Paper (§2.4, App. B.2): AdamW (0.9, 0.96, 1e-8), weight decay 4.5e-2,
# gradient clipping at 4, lr warmed up to 4.5e-4 over 5000 steps and decayed, batch 1024, 430k updates.
TRAIN = {
    # toy: 5000 steps of 16 sequences from 40k encoded images, 19.4 minutes on a 2-core CPU (Xeon, bf16)
    "toy": dict(steps=5000, batch_size=16, lr=1e-3, warmup=100, min_lr_frac=0.05, weight_decay=0.045,
                grad_clip=4.0, max_images=40_000),
    "small": dict(steps=200_000, batch_size=64, lr=4.5e-4, warmup=5000, min_lr_frac=0.1, weight_decay=0.045,
                grad_clip=4.0),
    "full": dict(steps=430_000, batch_size=2, lr=4.5e-4, warmup=5000, min_lr_frac=0.1, weight_decay=0.045,
                grad_clip=4.0),  # batch 2 × 512 GPUs = 1024
}
BETAS, EPS = (0.9, 0.96), 1e-8  # DALL-E App. B.2
VAL_IMAGES, JUDGE_CAPTIONS, JUDGE_SAMPLES = 2048, 200, 8


# ----------------------------------------------------------------------------------------------------
# the code cache

def encode_split(dvae, spec: str, split: str, dvae_hash: str, path: str, max_images, num_workers: int = 0) -> dict:
    """The dVAE's argmax codes (n, h·w) of a split and each image's caption lines, cached at `path`."""
    tag = {"dvae_hash": dvae_hash, "data": spec, "image_size": dvae.cfg.image_size, "max_images": max_images}
    device = next(dvae.parameters()).device

    def encode(images, lines, first):
        return {"codes": dvae.encode(images.to(device)).flatten(1).to(torch.int16)}  # (b, h·w)
    return data.cached_split(spec, dvae.cfg.image_size, split, max_images, path, tag, encode, "codes",
                             num_workers=num_workers)


def batches(cache: dict, tokenizer: Tokenizer, text_len: int, batch_size: int, seed: int):
    """Endless random batches (tokens (B, L), codes (B, N)) from a code cache; a random caption line each."""
    g = torch.Generator().manual_seed(seed)
    n = len(cache["codes"])
    while True:
        idx = torch.randint(n, (batch_size,), generator=g)
        texts = []
        for i in idx.tolist():
            lines = cache["captions"][i]
            texts.append(lines[torch.randint(len(lines), (1,), generator=g).item()])
        yield tokenizer.encode_batch(texts, text_len), cache["codes"][idx].long()


# ----------------------------------------------------------------------------------------------------

def main():
    parser = flags.make_parser("dalle", __doc__.split("\n")[0], DALLEConfig, PRESETS, TRAIN)
    parser.add_argument("--dvae", default="out/dvae/ckpt.pt", help="the frozen dVAE (default: out/dvae/ckpt.pt)")
    parser.add_argument("--clip", default="out/clip/ckpt.pt",
                        help="CLIP for reranking in the evaluation (default: out/clip/ckpt.pt; 'none' to skip)")
    parser.add_argument("--tokenizer", help="a .tiktoken file or tiktoken encoding name (default: the shipped "
                                            "vocabulary; on --resume the checkpoint's)")
    parser.add_argument("--max-images", type=int,
                        help="encode at most this many training images (default: toy 40000, else all)")
    parser.add_argument("--judge-captions", type=int, default=JUDGE_CAPTIONS,
                        help=f"(--data shapes) captions per split scored by the judge at the end, 0 to skip (default: {JUDGE_CAPTIONS})")
    args = parser.parse_args()
    cfg = flags.config_from_args(DALLEConfig, PRESETS, args)
    if args.dry_run:
        return train_utils.dry_run(DALLE, cfg, args, "dalle")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not a multiple of --n-head {cfg.n_head}")
    if cfg.attention not in ("full", "sparse"):
        raise UserError(f"--attention {cfg.attention!r}: choose full or sparse")

    device = train_utils.pick_device(args.device)
    dvae, dvae_hash = load_dvae(args.dvae, device)
    dvae.requires_grad_(False)
    tokenizer = checkpoint.run_tokenizer(args, "dalle")
    # the code grid, codebook and text vocabulary are facts of the dVAE and tokenizer, not choices
    facts = {"grid_size": dvae.cfg.grid_size, "image_vocab": dvae.cfg.vocab_size,
             "text_vocab": tokenizer.vocab_size, "pad_id": tokenizer.pad_id}
    checkpoint.take_facts(cfg, facts, "the dVAE and tokenizer", args)

    trainer = train_utils.Trainer(args, "dalle", cfg, DALLE, betas=BETAS, eps=EPS, extra_state={
        "tokenizer": tokenizer.state(),
        "upstream": {"dvae": os.path.abspath(args.dvae), "dvae_hash": dvae_hash, "dvae_config": vars(dvae.cfg)}})
    cfg = trainer.cfg
    checkpoint.check_facts(cfg, facts, f"--dvae {args.dvae} with its tokenizer")

    # --- encode the data once (the master), then every rank reads the cache
    caches = trainer.master_builds(
        {s: os.path.join(trainer.out, f"codes_{s}.pt") for s in ("train", "val")},
        lambda split, path: encode_split(dvae, args.data, split, dvae_hash, path,
                                         args.max_images if split == "train" else VAL_IMAGES, args.num_workers))
    train_cache, val_cache = caches["train"], caches["val"]
    train_batches = batches(train_cache, tokenizer, cfg.text_len, args.batch_size, args.seed + 1000 * trainer.rank
                            + trainer.step)
    clip = None
    if trainer.master and args.data == "shapes" and args.clip != "none" and os.path.exists(args.clip):
        clip = load_clip(args.clip, device)
    elif trainer.master and args.clip not in ("none", parser.get_default("clip")) and not os.path.exists(args.clip):
        raise UserError(f"--clip {args.clip}: no such checkpoint (train one with python train_clip.py)")

    def loss_fn(model, batch, step):
        text, codes = batch  # (B, L), (B, N)
        text = drop_captions(text, cfg.cond_drop, cfg.pad_id)  # classifier-free guidance: learn p(image) too
        loss, text_loss, image_loss = model(text, codes)
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def evaluate(step):
        model = trainer.eval_model()  # in eval mode, without gradients (Trainer.run_evaluation)
        sums = torch.zeros(3)
        val = batches(val_cache, tokenizer, cfg.text_len, 256, seed=0)
        n_batches = max(1, min(len(val_cache["codes"]), VAL_IMAGES) // 256)
        for _ in range(n_batches):
            text, codes = (t.to(trainer.device) for t in next(val))
            with train_utils.autocast(trainer.device, trainer.dtype):
                sums += torch.stack([v.float().cpu() for v in model(text, codes)])
        metrics = dict(zip(("val_loss", "val_text_loss", "val_image_loss"), (sums / n_batches).tolist()))
        pipe = DALLE1(model, tokenizer, dvae, clip)
        if args.data == "shapes" and step == args.steps and args.judge_captions > 0:  # at the end: 2 × 200 × 8
            for split, single, rerank in (("val", "judge_single", "judge_top1_rerank8"),
                                          ("heldout", "judge_heldout_single", "judge_heldout_rerank8")):
                res = judge_dalle1(pipe, split, args.judge_captions, JUDGE_SAMPLES)
                metrics[single] = res["single"]
                if "rerank" in res:
                    metrics[rerank] = res["rerank"]
        # a grid: 8 val captions, one row each, 8 samples best first
        captions = [lines[0] for lines in val_cache["captions"][:8]]
        images, _ = pipe.generate(captions, num=8, seed=step)
        train_utils.save_grid(images.flatten(0, 1), os.path.join(trainer.out, "samples.png"), nrow=8)
        with open(os.path.join(trainer.out, "samples.txt"), "w") as f:
            f.write("\n".join(captions) + "\n")
        return metrics

    trainer.fit(train_batches, loss_fn, evaluate)


if __name__ == "__main__":
    train_utils.main(main)
