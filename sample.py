"""Draw images for captions with the trained models.

    python sample.py --prompt "a small red circle at the top"               # DALL-E 1, the toy checkpoints in out/
    python sample.py --prompt "a large blue star on the left" --num 32 --keep 8 --temperature 0.9
    python sample.py --prompts-file captions.txt --dalle run/ckpt.pt --dvae dvae/ckpt.pt --clip clip/ckpt.pt
    python sample.py --prompt "a green square below a red heart" --image photo.png --prompt-rows 3

DALL-E 1 (--pipeline dalle1): each caption gets --num candidates from the transformer, decoded by the dVAE and
ranked by CLIP (when a CLIP checkpoint is there); the best --keep are kept. Writes OUT/grid.png (one row per
caption, best first) and OUT/<caption number>_<rank>.png for every kept image, and prints their paths.
Checkpoints are found by stage name: --dvae, --clip, --dalle default to out/<stage>/ckpt.pt.
"""
import argparse
import os

import torch

from nanodalle import UserError, data, train_utils
from nanodalle.pipeline import DALLE1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="dalle1", choices=["dalle1"], help="(default: dalle1)")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeat the flag for several)")
    p.add_argument("--prompts-file", help="a text file with one caption per line")
    p.add_argument("--num", type=int, default=8, help="candidates sampled per caption (default: 8)")
    p.add_argument("--keep", type=int, help="images kept per caption, best first (default: all of --num)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0; the paper samples at 1)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely codes only (default: off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of codes with this mass")
    p.add_argument("--cond-scale", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 = off (default), 2-4 follow the caption more")
    p.add_argument("--image", help="complete this image: keep its top --prompt-rows rows of codes (§3.3)")
    p.add_argument("--prompt-rows", type=int, default=None, help="rows of codes kept from --image (default: half)")
    p.add_argument("--dvae", default="out/dvae/ckpt.pt")
    p.add_argument("--clip", default="out/clip/ckpt.pt", help="for reranking; 'none' to skip (default: %(default)s)")
    p.add_argument("--dalle", default="out/dalle/ckpt.pt", help="the DALL-E 1 transformer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once (default: 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out", default="out/samples", help="output folder (default: out/samples)")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UserError(f"--prompts-file {args.prompts_file}: no such file")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError("no prompt: give --prompt \"a caption\" (repeatable) or --prompts-file FILE")
    for p in prompts:
        if not p.strip():
            raise UserError("an empty --prompt: give a caption to draw")
    return prompts


def check_sampling_flags(args):
    if args.num < 1:
        raise UserError(f"--num {args.num}: sample at least 1 candidate per caption")
    args.keep = args.num if args.keep is None else args.keep
    if not 1 <= args.keep <= args.num:
        raise UserError(f"--keep {args.keep}: keep between 1 and --num {args.num} images")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be ≥ 0 (0 = always the most likely code)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be ≥ 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")


def sample_dalle1(args, prompts, device):
    clip = None if args.clip == "none" else args.clip
    if clip is not None and not os.path.exists(clip):
        if args.clip != "out/clip/ckpt.pt":
            raise UserError(f"--clip {clip}: no such checkpoint (or --clip none to sample without reranking)")
        print(f"no CLIP at {clip}: images are not reranked")
        clip = None
    pipe = DALLE1.from_checkpoints(args.dalle, args.dvae, clip, device)
    text_len = pipe.dalle.cfg.text_len
    for p in prompts:
        n = len(pipe.tokenizer.encode(p))
        if n > text_len - 1:
            print(f"warning: {p!r} is {n} tokens; the model reads {text_len - 1}: the rest is cut")
    prompt_images, rows = None, 0
    if args.image:
        g = pipe.dalle.cfg.grid_size
        rows = g // 2 if args.prompt_rows is None else args.prompt_rows
        if not 0 < rows < g:
            raise UserError(f"--prompt-rows {rows}: keep between 1 and {g - 1} rows of the {g}×{g} code grid")
        try:
            image = data.to_tensor(data.load_image(args.image), pipe.dvae.cfg.image_size)
        except data.BadSample:
            raise UserError(f"--image {args.image}: not a readable image")
        prompt_images = image[None].expand(len(prompts), -1, -1, -1)
    images, scores = pipe.generate(prompts, num=args.num, seed=args.seed, prompt_images=prompt_images,
                                   prompt_rows=rows, batch_size=args.batch_size, progress=True,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   cond_scale=args.cond_scale)
    return images[:, :args.keep], scores[:, :args.keep], pipe.clip is not None


def main():
    args = parse_args()
    prompts = read_prompts(args)
    check_sampling_flags(args)
    device = train_utils.pick_device(args.device)
    if args.image and not os.path.isfile(args.image):
        raise UserError(f"--image {args.image}: no such file")
    images, scores, ranked = sample_dalle1(args, prompts, device)  # (P, keep, 3, H, W), (P, keep)
    os.makedirs(args.out, exist_ok=True)
    grid = os.path.join(args.out, "grid.png")
    train_utils.save_grid(images.flatten(0, 1), grid, nrow=args.keep)
    for p, prompt in enumerate(prompts):
        for k in range(args.keep):
            path = os.path.join(args.out, f"{p:03d}_{k}.png")
            train_utils.save_grid(images[p, k:k + 1], path, nrow=1, pad=0)
        score = f" (CLIP score of the best: {scores[p, 0]:.3f})" if ranked else ""
        print(f"{prompt!r}: {args.out}/{p:03d}_*.png{score}")
    print(f"grid ({len(prompts)} rows, {'best first' if ranked else 'not reranked'}): {grid}")


if __name__ == "__main__":
    train_utils.main(main)
