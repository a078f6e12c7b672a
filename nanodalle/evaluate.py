"""Every stage scored in one command: JSON plus a markdown table. Also the metrics the training scripts log.

    python -m nanodalle.evaluate                              # every stage whose checkpoints are in out/
    python -m nanodalle.evaluate --only dalle2 --captions 200 --ddpm-captions 50 --json out/eval.json

dvae (out/dvae): PSNR of reconstructions from argmax codes, codebook perplexity and the fraction of codes used,
on the first 512 images of each split. clip (out/clip): top-1 retrieval among 100 (text -> image, image ->
text) on the first 1000 pairs; on the built-in data also zero-shot colour, shape and position of the
single-object images. DALL-E 1 (out/dvae, out/dalle, out/clip): the judge's full-match accuracy of one
sample and of the CLIP-best of 8, sampled with --temperature, --top-k, --top-p and --cond-scale (as in
sample.py; the defaults are the paper's). DALL-E 2 (out/clip, out/prior, out/decoder): one sample per
caption with 50 DDIM steps, guided, and with 1000 ancestral DDPM steps on the first --ddpm-captions of the
same captions (DDIM again on just those, for a paired comparison), with their times; the cosine between the
prior's z_i and the true image's. Both pipelines: the CLIP score of what they draw, 100 × the cosine between
CLIP's embeddings of the image and its caption (Hessel et al. 2021 without their 2.5 factor; the CLIP that
reranks and conditions the pipelines, so it flatters them: a relative measure, not an independent one).
Each on "val" (colour-shape pairs seen in training) and "heldout" (never seen), separately; the dVAE and CLIP
on "val" only with --data other than shapes. The upsampler is not used: the judge reads the decoder's images.
"""
import argparse
import math
import os
import time

import torch

from nanodalle import UserError, checkpoint, data, shapes, train_utils
from nanodalle.pipeline import (DALLE1, DALLE2, add_dalle1_sampling_args, check_dalle1_sampling, judge_dalle1,
                                judge_dalle2, load_dvae)

SPLITS = ("val", "heldout")
DVAE_IMAGES, CLIP_PAIRS, CHUNK = 512, 1000, 100


# ----------------------------------------------------------------------------------------------------
# the dVAE and CLIP (also what train_dvae.py and train_clip.py log)

def codebook_usage(codes: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """Perplexity exp(H(p)) of the code histogram p, and the fraction of the K codes used at all."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return math.exp(-(p * p.log()).sum().item()), (counts > 0).float().mean().item()


@torch.no_grad()
def evaluate_dvae(model, images: torch.Tensor, batch_size: int = 128) -> tuple[dict, torch.Tensor]:
    """Held-out reconstruction from argmax codes (what the transformer will see): PSNR on [0, 1] pixels."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    codes, recons = [], []
    for i in range(0, len(images), batch_size):
        c = model.encode(images[i:i + batch_size].to(device))    # (b, h, w)
        codes.append(c)
        recons.append(model.decode(c).float().cpu())             # (b, C, H, W)
    codes, recons = torch.cat(codes), torch.cat(recons)
    mse = ((recons - images) / 2).pow(2).mean().item()          # /2: [-1, 1] -> [0, 1] scale
    perplexity, used = codebook_usage(codes, model.cfg.vocab_size)
    model.train(was_training)
    metrics = {"psnr": 10 * math.log10(1 / max(mse, 1e-12)), "mse": mse, "perplexity": perplexity,
               "perplexity_frac": perplexity / model.cfg.vocab_size, "codes_used_frac": used}
    return metrics, recons


@torch.no_grad()
def embed_pairs(model, images, tokens, batch_size: int = 250):
    """(N, D) image and text embeddings, computed batch_size at a time."""
    device = model.logit_scale.device
    img = torch.cat([model.encode_image(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)) for i in range(0, len(tokens), batch_size)])
    return img.float(), txt.float()


def retrieval_top1(img, txt, chunk: int = CHUNK) -> tuple[float, float]:
    """Top-1 retrieval among `chunk` candidates: the N pairs are cut into chunks of `chunk` (fewer than
    `chunk` pairs: one chunk of all); caption i is right when image i scores highest among its chunk's
    images (text -> image), image i when caption i does (image -> text). Averaged over the chunks."""
    chunk = min(chunk, len(img))
    n = len(img) // chunk * chunk
    t2i = i2t = 0
    for s in range(0, n, chunk):
        sim = img[s:s + chunk] @ txt[s:s + chunk].t()  # (chunk, chunk): sim[i, j] = image i · caption j
        own = torch.arange(chunk, device=sim.device)
        t2i += (sim.argmax(dim=0) == own).sum().item()  # column j: which image fits caption j best?
        i2t += (sim.argmax(dim=1) == own).sum().item()  # row i: which caption fits image i best?
    return t2i / n, i2t / n


@torch.no_grad()
def evaluate_clip(model, dataset, images, tokens, zero_shot: bool) -> dict:
    """Retrieval top-1 of 100 on (images, tokens); zero_shot (a shapes data set): colour, shape and position
    of its single-object images, classified by prompt ensembles in the captions' own words."""
    img, txt = embed_pairs(model, images, tokens)
    t2i, i2t = retrieval_top1(img, txt)
    # the CLIP score of real pairs: what a generated image scoring as high as its caption's true image gets
    metrics = {"t2i_top1_100": t2i, "i2t_top1_100": i2t, "clip_score_true": 100 * (img * txt).sum(-1).mean().item()}
    single = [i for i in range(len(images)) if zero_shot and len(dataset.scene(i).objects) == 1]
    if single:
        device = model.logit_scale.device
        for attr in ("color", "shape", "position"):
            names, _ = shapes.attribute_prompts(attr)
            truth = torch.tensor([names.index(getattr(dataset.scene(i).objects[0], attr)) for i in single])
            pred = model.zero_shot_classify(images[single].to(device), shapes.zero_shot_prompts(attr)).cpu()
            metrics[f"zeroshot_{attr}"] = (pred == truth).float().mean().item()
    return metrics


def eval_splits(args) -> tuple[str, ...]:
    return SPLITS if args.data == "shapes" else ("val",)


def evaluate_dvae_stage(args, device) -> dict:
    model, _ = load_dvae(args.dvae, device)
    out = {}
    for split in eval_splits(args):
        images = data.first_images(data.make_dataset(args.data, model.cfg.image_size, split), DVAE_IMAGES)
        metrics, _ = evaluate_dvae(model, images)
        out.update({f"dvae_{split}_{k}": metrics[k] for k in ("psnr", "perplexity", "codes_used_frac")})
    return out


def evaluate_clip_stage(args, device) -> dict:
    from nanodalle.clip import load_clip
    model = load_clip(args.clip, device)
    out = {}
    for split in eval_splits(args):
        dataset = data.make_dataset(args.data, model.cfg.image_size, split)
        images, captions = data.first_pairs(dataset, CLIP_PAIRS)
        tokens = model.tokenizer.encode_batch(captions, model.cfg.context_length)
        metrics = evaluate_clip(model, dataset, images, tokens, zero_shot=args.data == "shapes")
        out.update({f"clip_{split}_{k}": v for k, v in metrics.items()})
    return out


# ----------------------------------------------------------------------------------------------------
# the two pipelines, judged

def evaluate_dalle1(args, device) -> dict:
    pipe = DALLE1.from_checkpoints(args.dalle, args.dvae, args.clip, device)
    out = {}
    for split in SPLITS:
        res = judge_dalle1(pipe, split, args.captions, num=8, **check_dalle1_sampling(args))
        out[f"dalle1_{split}_single"], out[f"dalle1_{split}_rerank8"] = res["single"], res.get("rerank")
        if "clip_score_single" in res:
            out[f"dalle1_{split}_clip_score_single"] = res["clip_score_single"]
            out[f"dalle1_{split}_clip_score_rerank8"] = res["clip_score_rerank"]
    return out


def evaluate_dalle2(args, device) -> dict:
    pipe = DALLE2.from_checkpoints(args.clip, args.decoder, args.prior, None, device)
    out = {}
    for split in SPLITS:
        t0 = time.time()
        res = judge_dalle2(pipe, split, args.captions, steps=50)
        out[f"dalle2_{split}_ddim50"], out[f"dalle2_{split}_ddim50_s"] = res["judge"], time.time() - t0
        out[f"dalle2_{split}_prior_cosine_to_true"] = res["prior_cosine_to_true"]
        out[f"dalle2_{split}_clip_score"] = res["clip_score"]
    if args.ddpm_captions > 0:
        n = args.ddpm_captions
        out[f"dalle2_val_ddim50_first{n}"] = judge_dalle2(pipe, "val", n, steps=50)["judge"]
        t0 = time.time()
        out[f"dalle2_val_ddpm1000_first{n}"] = judge_dalle2(pipe, "val", n, sampler="ddpm")["judge"]
        out[f"dalle2_val_ddpm1000_first{n}_s"] = time.time() - t0
    return out


STAGES = {"dvae": evaluate_dvae_stage, "clip": evaluate_clip_stage, "dalle1": evaluate_dalle1,
          "dalle2": evaluate_dalle2}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=list(STAGES), action="append", help="evaluate these only (repeatable)")
    for stage in ("dvae", "clip", "dalle", "prior", "decoder"):
        p.add_argument(f"--{stage}", default=f"out/{stage}/ckpt.pt", help="(default: %(default)s)")
    p.add_argument("--data", default="shapes",
                   help="dvae and clip: 'shapes' (default; val and heldout) or your folder / .tar shards (val)")
    p.add_argument("--captions", type=int, default=200, help="pipelines: captions per split (default: 200)")
    p.add_argument("--ddpm-captions", type=int, default=0,
                   help="DALL-E 2: also sample this many val captions with 1000 DDPM steps (slow on a CPU; default 0)")
    add_dalle1_sampling_args(p.add_argument_group("DALL-E 1 sampling"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    device = train_utils.pick_device(args.device)
    needs = {"dvae": (args.dvae,), "clip": (args.clip,), "dalle1": (args.dvae, args.dalle, args.clip),
             "dalle2": (args.clip, args.prior, args.decoder)}
    wanted = args.only or [name for name in STAGES if all(map(os.path.exists, needs[name]))]
    if not wanted:
        raise UserError("no trained stage in out/: train one first (see the README), or pass checkpoint paths")
    if args.data != "shapes" and any(name in ("dalle1", "dalle2") for name in wanted):
        if args.only:
            raise UserError("the pipelines are judged on the built-in shapes only: drop --data, or --only dvae/clip")
        wanted = [name for name in wanted if name in ("dvae", "clip")]
    results = {}
    for name in wanted:
        results.update(STAGES[name](args, device))
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        checkpoint.write_json_atomic(results, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    train_utils.main(main)
