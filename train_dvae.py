"""Stage 1 of DALL-E: train the discrete VAE (nanodalle/dvae.py).

    python train_dvae.py                      # toy preset on the built-in shapes, a few minutes on a CPU
    python train_dvae.py --data my_images/ --size small
    torchrun --nproc_per_node 8 train_dvae.py --size full --data shards/
    python train_dvae.py --size full --dry-run

Writes OUT/ckpt.pt, OUT/log.jsonl, OUT/metrics.json (held-out psnr, mse, perplexity, codes_used_frac, and with
--data shapes judge_recon: the fraction of reconstructions the shapes judge passes, DALL-E 1's ceiling)
and OUT/recon.png (pairs of rows: held-out images above, their reconstructions from argmax codes below).
"""

import torch

from nanodalle import data, flags, shapes, train_utils
from nanodalle.dvae import DVAE, DVAEConfig, PRESETS, cosine
from nanodalle.evaluate import evaluate_dvae

# Training settings per preset. Paper (App. A.2): AdamW (0.9, 0.999, 1e-8), wd 1e-4, lr 1e-4 cosine to
# 1.25e-6, batch 512, 3M updates. The toy preset trades those for speed on a 2-core CPU.
TRAIN = {
    "toy": dict(steps=2200, batch_size=32, lr=2e-3, min_lr_frac=0.05, weight_decay=1e-4),
    "small": dict(steps=200_000, batch_size=64, lr=1e-4, min_lr_frac=0.0125, weight_decay=1e-4),
    "full": dict(steps=3_000_000, batch_size=8, lr=1e-4, min_lr_frac=0.0125, weight_decay=1e-4),  # 8/GPU × 64
}
EVAL_IMAGES = 512


def main():
    parser = flags.make_parser("dvae", __doc__.split("\n")[0], DVAEConfig, PRESETS, TRAIN)
    parser.add_argument("--random-crop", action="store_true", help="random instead of centre crops (user data)")
    args = parser.parse_args()
    cfg = flags.config_from_args(DVAEConfig, PRESETS, args)
    if args.dry_run:
        return train_utils.dry_run(DVAE, cfg, args, "dvae")
    if cfg.recon not in ("mse", "logit_laplace"):
        raise train_utils.UserError(f"--recon {cfg.recon!r}: choose mse or logit_laplace")

    # channels_last: the memory layout CPU (oneDNN) and GPU (cuDNN) convolutions run fastest in (~1.4× here)
    trainer = train_utils.Trainer(args, "dvae", cfg, lambda c: DVAE(c).to(memory_format=torch.channels_last))
    cfg = trainer.cfg  # on --resume, the checkpoint's config
    train_set = data.make_dataset(args.data, cfg.image_size, "train", args.random_crop,
                                  trainer.rank, trainer.world_size, args.seed)
    val_set = data.make_dataset(args.data, cfg.image_size, "val")
    val_images = data.first_images(val_set, EVAL_IMAGES)
    batches = data.loader(train_set, args.batch_size, trainer.rank, trainer.world_size,
                          seed=args.seed + trainer.step, num_workers=args.num_workers,
                          pin_memory=trainer.device.type == "cuda")

    def loss_fn(model, batch, step):
        images = batch[0].contiguous(memory_format=torch.channels_last)      # (B, C, H, W), captions unused
        tau = cosine(step, cfg.temp_start, cfg.temp_end, cfg.temp_steps)      # App. A.2: τ 1 -> 1/16
        beta = cosine(step, 0.0, cfg.kl_weight, cfg.kl_warmup)                # App. A.2: β 0 -> 6.6
        loss, _ = model(images, tau, beta)
        return loss, {"tau": tau, "beta": beta}

    def evaluate(step):
        model = trainer.eval_model()
        metrics, recons = evaluate_dvae(model, val_images)
        n = min(32, len(val_images))
        rows = []  # pairs of rows of 8: originals, then their reconstructions
        for i in range(0, n, 8):
            rows += [val_images[i:i + 8], recons[i:i + 8]]
        train_utils.save_grid(torch.cat(rows), f"{trainer.out}/recon.png", nrow=8)
        if args.data == "shapes":  # the ceiling of DALL-E 1 on this dVAE: can the judge read its reconstructions?
            scenes = [val_set.scene(i) for i in range(len(recons))]
            metrics["judge_recon"] = shapes.judge_batch(recons, scenes)["full"]
        skipped = data.skipped_summary(train_set)
        return {**metrics, **({"skipped": skipped} if skipped else {})}

    trainer.fit(batches, loss_fn, evaluate)


if __name__ == "__main__":
    train_utils.main(main)
