"""Stage 2 of unCLIP: train the diffusion decoder (CLIP image embedding -> pixels) or an upsampler.

    python train_decoder.py                          # toy decoder, 32 px, on the built-in shapes with out/clip
    python train_decoder.py --stage upsampler        # toy upsampler 32 -> 64 px (no CLIP needed) -> out/upsampler
    python train_decoder.py --size small --data my_images/ --clip out/clip/ckpt.pt
    torchrun --nproc_per_node 8 train_decoder.py --size full --data shards/ --clip ...
    python train_decoder.py --size full --dry-run; python train_decoder.py --stage upsampler --size full2 --dry-run

The decoder (unCLIP §2.1; nanodalle/unet.py) learns p(x | z_i, caption): a UNet predicts the noise ε added to
an image by the forward process (diffusion.py, L_simple), reading the image's CLIP embedding z_i (added to the
timestep embedding and as 4 context tokens) and its caption (GLIDE's text path). z_i is computed on the fly
by the frozen CLIP from the very image being denoised. For classifier-free guidance, z_i is dropped 10% and
the caption 50% of the time (independently). Sampling reads the EMA weights.

The upsampler (--stage upsampler) learns p(x | low-res x): the same UNet conditioned on the image
downsampled to low_res_size, blurred by a 3×3 Gaussian of σ 0.6 in training (unCLIP §2.1: it makes the
upsampler robust to the decoder's imperfect outputs), upsampled and concatenated to x_t. It has no attention,
so it trains on random crops (train_crop, unCLIP: a quarter of the side) and samples whole images.
Presets --size: decoder toy, small, full; upsampler toy (32 -> 64), small (64 -> 256), full (64 -> 256),
full2 (256 -> 1024).

Writes OUT/ckpt.pt (decoder: with the tokenizer and CLIP's path, config and fingerprint under "upstream"),
OUT/log.jsonl, OUT/samples.png and OUT/metrics.json:
  val_mse                      the training loss on 256 val images, with fixed t and noise and no dropping
  decoder:  judge_true_emb     (--data shapes) the judge's full-match accuracy on images decoded (DDIM, the
                               config's steps and guidance) from the true CLIP embeddings of 200 val images
                               (--judge-captions: how many; 0 skips every judge)
            judge_ddim50, prior_cosine_to_true   (--data shapes, with --prior, at the end) the whole pipeline on
                               200 val captions: prior -> z_i -> 50 DDIM steps, guided; the cosine of the
                               prior's z_i to the true image's (judge_ddim50_s: its time in seconds)
            judge_ddpm1000     the same with 1000-step ancestral DDPM (--ddpm-captions of them; slow on a CPU)
  upsampler: psnr_upsampled, psnr_bilinear    on 64 val images: the upsampler's output (from the un-blurred
                               low-res image) and bilinear upsampling, against the true image
  samples.png                  decoder: val images (top), decoded from their z_i + caption (bottom);
                               upsampler: low-res (nearest), bilinear, upsampled, true
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from nanodalle import UserError, checkpoint, data, flags, train_utils
from nanodalle.clip import load_clip
from nanodalle.pipeline import (DALLE2, clip_image_embedding, decoder_model_fn, judge_dalle2, make_diffusion,
                                state_hash, upsample_images)
from nanodalle.unet import PRESETS, UNet, UNetConfig

STAGE_PRESETS = {
    "decoder": {"toy": "toy", "small": "small", "full": "full"},
    "upsampler": {"toy": "toy_upsampler", "small": "small_upsampler", "full": "full_upsampler",
                  "full2": "full_upsampler2"},
}
# Training settings per preset. unCLIP App. C (Table 3): decoder lr 1.2e-4, batch 2048, 800k updates;
# upsamplers lr 1.2e-4 / 1e-4, batch 1024 / 512, 1M updates; Adam, EMA (ADM: 0.9999).
TRAIN = {
    "decoder": {
        "toy": dict(steps=1500, batch_size=32, lr=1e-3, warmup=100, min_lr_frac=0.05, weight_decay=0.0, ema=0.995),
        "small": dict(steps=300_000, batch_size=128, lr=1.2e-4, warmup=2000, ema=0.9999),
        "full": dict(steps=800_000, batch_size=8, lr=1.2e-4, warmup=5000, ema=0.9999),  # × 256 GPUs = 2048
    },
    "upsampler": {
        "toy": dict(steps=600, batch_size=32, lr=1e-3, warmup=50, min_lr_frac=0.05, weight_decay=0.0, ema=0.99),
        "small": dict(steps=300_000, batch_size=64, lr=1.2e-4, warmup=2000, ema=0.9999),
        "full": dict(steps=1_000_000, batch_size=4, lr=1.2e-4, warmup=5000, ema=0.9999),  # × 256 = 1024
        "full2": dict(steps=1_000_000, batch_size=2, lr=1e-4, warmup=5000, ema=0.9999),  # × 256 = 512
    },
}
VAL_IMAGES, JUDGE_CAPTIONS, PIPELINE_STEPS = 256, 200, 50


def gaussian_blur(images: torch.Tensor, sigma: float, kernel: int = 3) -> torch.Tensor:
    """(B, C, H, W) blurred by a kernel×kernel Gaussian of std sigma, per channel, reflecting at the edges."""
    if sigma <= 0:
        return images
    x = torch.arange(kernel, dtype=torch.float32, device=images.device) - (kernel - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    w = w / w.sum()  # (k,) the 1-D Gaussian; the 2-D one is its outer product
    C = images.size(1)
    weight = (w[:, None] * w[None, :]).expand(C, 1, kernel, kernel).to(images.dtype)  # (C, 1, k, k)
    padded = F.pad(images, [kernel // 2] * 4, mode="reflect")
    return F.conv2d(padded, weight, groups=C)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), each pixel the mean of the block it covers (an area average, as
    rendering at the smaller size would give): what the decoder should have drawn at its size."""
    return F.interpolate(images, size=(size, size), mode="area")


def upsampler_batch(images: torch.Tensor, cfg: UNetConfig, generator: torch.Generator | None):
    """High-res images (B, 3, H, W) -> (x0, low): a random train_crop window of each and the same window of its
    blurred low-res version. Windows start on multiples of the scale so that both crops cover the same pixels."""
    scale = cfg.image_size // cfg.low_res_size
    low = gaussian_blur(downsample(images, cfg.low_res_size), cfg.blur_sigma)  # (B, 3, h, w)
    crop = cfg.train_crop or cfg.image_size
    if crop >= cfg.image_size:
        return images, low
    n = (cfg.image_size - crop) // scale + 1  # possible window starts, in low-res pixels
    xs, ys = torch.randint(n, (2, images.size(0)), generator=generator).tolist()
    c = crop // scale
    x0 = torch.stack([im[:, y * scale:y * scale + crop, x * scale:x * scale + crop]
                      for im, x, y in zip(images, xs, ys)])
    lows = torch.stack([lo[:, y:y + c, x:x + c] for lo, x, y in zip(low, xs, ys)])
    return x0, lows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1).float(), b.float()).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", default="decoder", choices=list(STAGE_PRESETS))
    stage = pre.parse_known_args()[0].stage
    presets = {size: PRESETS[name] for size, name in STAGE_PRESETS[stage].items()}
    parser = flags.make_parser(stage, __doc__.split("\n")[0], UNetConfig, presets, TRAIN[stage])
    parser.add_argument("--stage", default="decoder", choices=list(STAGE_PRESETS),
                        help="decoder (z_i + caption -> image) or upsampler (image -> 2-4× larger) (default: decoder)")
    parser.add_argument("--clip", default="out/clip/ckpt.pt", help="the frozen CLIP (decoder; default: %(default)s)")
    parser.add_argument("--prior", default="out/prior/ckpt.pt",
                        help="(decoder, --data shapes) judge the whole pipeline with it at the end, if it exists "
                             "(default: %(default)s; 'none' to skip)")
    parser.add_argument("--judge-captions", type=int, default=JUDGE_CAPTIONS,
                        help=f"(decoder, --data shapes) val captions of the final judges, 0 to skip them "
                             f"(default: {JUDGE_CAPTIONS})")
    parser.add_argument("--ddpm-captions", type=int, default=JUDGE_CAPTIONS,
                        help=f"captions of the final 1000-step DDPM judge, 0 to skip (default: {JUDGE_CAPTIONS})")
    args = parser.parse_args()
    cfg = flags.config_from_args(UNetConfig, presets, args)
    if stage == "upsampler" and (not cfg.low_res_size or cfg.image_size % cfg.low_res_size):
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of --low-res-size {cfg.low_res_size}")
    if stage == "upsampler" and cfg.train_crop and cfg.train_crop % (cfg.image_size // cfg.low_res_size):
        raise UserError(f"--train-crop {cfg.train_crop} must be a multiple of the scale "
                        f"{cfg.image_size // cfg.low_res_size}")
    flags.check_diffusion(cfg.timesteps, cfg.schedule, cfg.predict, cfg.schedule_shift)
    if args.dry_run:
        return train_utils.dry_run(UNet, cfg, args, stage)

    device = train_utils.pick_device(args.device)
    extra, clip, facts = {}, None, {}
    if stage == "decoder":
        clip = load_clip(args.clip, device).requires_grad_(False)
        tokenizer = clip.tokenizer  # the decoder's caption path uses CLIP's vocabulary
        facts = {"clip_dim": clip.cfg.embed_dim, "text_vocab": tokenizer.vocab_size, "pad_id": tokenizer.pad_id}
        checkpoint.take_facts(cfg, facts, "CLIP and its tokenizer", args)
        extra = {"tokenizer": tokenizer.state(), "upstream": {
            "clip": os.path.abspath(args.clip), "clip_hash": state_hash(clip.state_dict()),
            "clip_config": vars(clip.cfg)}}
    trainer = train_utils.Trainer(args, stage, cfg, UNet, extra_state=extra)
    cfg = trainer.cfg
    if facts:
        checkpoint.check_facts(cfg, facts, f"--clip {args.clip}")
    diffusion = make_diffusion(cfg).to(trainer.device)

    train_set = data.make_dataset(args.data, cfg.image_size, "train", rank=trainer.rank,
                                  world_size=trainer.world_size, seed=args.seed)
    val_set = data.make_dataset(args.data, cfg.image_size, "val")
    loader = data.loader(train_set, args.batch_size, trainer.rank, trainer.world_size,
                         seed=args.seed + trainer.step, num_workers=args.num_workers,
                         pin_memory=trainer.device.type == "cuda")
    crop_gen = torch.Generator().manual_seed(args.seed + 1000 * trainer.rank + trainer.step)

    def batches():
        for images, captions in loader:
            if stage == "upsampler":
                yield upsampler_batch(images, cfg, crop_gen)
            else:
                yield images, tokenizer.encode_batch(captions, cfg.text_len)

    def loss_fn(model, batch, step):
        if stage == "upsampler":
            x0, low = batch
            return diffusion.loss(lambda x_t, t: model(x_t, t, low_res=low), x0, snr_gamma=cfg.snr_gamma), {}
        images, tokens = batch
        with torch.no_grad():
            clip_emb = clip_image_embedding(clip, images)  # (B, D) of the very images being denoised
        B = images.size(0)
        drop_clip = torch.rand(B, device=images.device) < cfg.clip_drop  # unCLIP §2.1: 10%
        drop_text = torch.rand(B, device=images.device) < cfg.text_drop  # and 50%, independently
        return diffusion.loss(lambda x_t, t: model(x_t, t, clip_emb, tokens, drop_clip=drop_clip,
                                                   drop_text=drop_text), images, snr_gamma=cfg.snr_gamma), {}

    # --- a fixed evaluation batch
    val_images, val_captions = data.first_pairs(val_set, VAL_IMAGES)
    if stage == "decoder":
        val_tokens = tokenizer.encode_batch(val_captions, cfg.text_len)
        with torch.no_grad():
            val_emb = clip_image_embedding(clip, val_images.to(trainer.device))

    def evaluate(step):
        model = trainer.eval_model()  # in eval mode, without gradients (Trainer.run_evaluation)
        g = torch.Generator().manual_seed(0)  # the same t and noise at every evaluation
        metrics, mse, n = {}, 0.0, len(val_images)
        for s in range(0, n, 64):
            x = val_images[s:s + 64].to(trainer.device)
            t = torch.randint(cfg.timesteps, (len(x),), generator=g).to(trainer.device)
            if stage == "upsampler":
                low = gaussian_blur(downsample(x, cfg.low_res_size), cfg.blur_sigma)
                model_fn = lambda x_t, tt, low=low: model(x_t, tt, low_res=low)  # noqa: E731
            else:
                emb, tok = val_emb[s:s + 64], val_tokens[s:s + 64].to(trainer.device)
                model_fn = lambda x_t, tt, emb=emb, tok=tok: model(x_t, tt, emb, tok)  # noqa: E731
            noise = torch.randn(x.shape, generator=g).to(trainer.device)
            with train_utils.autocast(trainer.device, trainer.dtype):
                mse += diffusion.loss(model_fn, x, t=t, noise=noise).item() * len(x)
        metrics["val_mse"] = mse / n
        gen = torch.Generator(trainer.device).manual_seed(0)
        if stage == "upsampler":
            metrics.update(evaluate_upsampler(model, gen))
        else:
            metrics.update(evaluate_decoder(model, gen, last=step == args.steps))
        return metrics

    def evaluate_upsampler(model, gen):
        x = val_images[:64].to(trainer.device)
        low = downsample(x, cfg.low_res_size)  # the decoder's output would not be blurred
        with train_utils.autocast(trainer.device, trainer.dtype):
            up = upsample_images(model, diffusion, low, generator=gen).float()
        bilinear = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        nearest = F.interpolate(low, size=x.shape[-2:], mode="nearest")
        k = min(8, len(x))  # a small folder data set may hold fewer val images
        train_utils.save_grid(torch.cat([nearest[:k], bilinear[:k], up[:k], x[:k]]),
                              os.path.join(trainer.out, "samples.png"), nrow=k)
        return {"psnr_upsampled": psnr(up, x), "psnr_bilinear": psnr(bilinear, x)}

    def evaluate_decoder(model, gen, last: bool):
        out, k = {}, min(8, len(val_images))  # a small folder data set may hold fewer val images
        model_fn = decoder_model_fn(model, val_emb[:k], val_tokens[:k].to(trainer.device), cfg.guidance_scale)
        shape = (k, cfg.out_channels, cfg.image_size, cfg.image_size)
        with train_utils.autocast(trainer.device, trainer.dtype):
            decoded = diffusion.ddim_sample(model_fn, shape, cfg.sample_steps, generator=gen, clip_x0=1.0).float()
        train_utils.save_grid(torch.cat([val_images[:k], decoded.cpu()]), os.path.join(trainer.out, "samples.png"),
                              nrow=k)
        if args.data != "shapes" or not last or args.judge_captions <= 0:
            return out
        pipe = DALLE2(clip, model, tokenizer)
        out["judge_true_emb"] = judge_true_embeddings(pipe, gen)
        if args.prior != "none" and os.path.exists(args.prior):
            from nanodalle.prior import DiffusionPrior, PriorConfig
            prior_ckpt = checkpoint.load_checkpoint(args.prior, "prior")
            pipe.prior = checkpoint.model_from_checkpoint(prior_ckpt, PriorConfig, DiffusionPrior).to(trainer.device)
            t0 = time.time()
            res = judge_dalle2(pipe, "val", args.judge_captions, steps=PIPELINE_STEPS)
            out.update({"judge_ddim50": res["judge"], "judge_ddim50_s": time.time() - t0,
                        "prior_cosine_to_true": res["prior_cosine_to_true"]})
            if args.ddpm_captions > 0:
                t0 = time.time()
                res = judge_dalle2(pipe, "val", args.ddpm_captions, sampler="ddpm")
                out.update({"judge_ddpm1000": res["judge"], "judge_ddpm1000_s": time.time() - t0})
        return out

    def judge_true_embeddings(pipe, gen):
        from nanodalle.shapes import ShapesDataset, judge
        dataset = ShapesDataset("val", cfg.image_size)
        passed = 0
        n = args.judge_captions
        for s in range(0, n, 100):
            ids = list(range(s, min(s + 100, n)))
            images, captions = zip(*(dataset[i] for i in ids))
            emb = clip_image_embedding(clip, torch.stack(images).to(trainer.device))
            with train_utils.autocast(trainer.device, trainer.dtype):
                out = pipe.decode(emb, pipe.decoder_tokens(list(captions)), generator=gen).float()
            passed += sum(judge(out[j], dataset.scene(i))["full"] for j, i in enumerate(ids))
        return passed / n

    trainer.fit(batches(), loss_fn, evaluate)


if __name__ == "__main__":
    train_utils.main(main)
