"""Score trained pipelines with the shapes judge, in one command: JSON and a markdown table.

    python -m nanodalle.evaluate                              # every pipeline whose checkpoints are in out/
    python -m nanodalle.evaluate --only dalle2 --captions 200 --ddpm-captions 50 --json out/eval.json

DALL-E 1 (out/dvae, out/dalle, out/clip): the judge's full-match accuracy of one sample and of the CLIP-best
of 8, sampled with --temperature, --top-k, --top-p and --cond-scale (as in sample.py; the defaults are the
paper's). DALL-E 2 (out/clip, out/prior, out/decoder): one sample per caption with 50 DDIM steps, guided,
and with 1000 ancestral DDPM steps on the first --ddpm-captions of the same captions (DDIM again on just
those, for a paired comparison), with their times; the cosine between the prior's z_i and the true image's.
Each on the first --captions captions of "val" (colour-shape pairs seen in training) and of "heldout" (never
seen), separately. The upsampler is not used: the judge reads the decoder's images.
"""
import argparse
import json
import os
import time

import torch

from nanodalle import UserError, train_utils
from nanodalle.pipeline import (DALLE1, DALLE2, add_dalle1_sampling_args, check_dalle1_sampling, judge_dalle1,
                                judge_dalle2)

SPLITS = ("val", "heldout")


def evaluate_dalle1(args, device) -> dict:
    pipe = DALLE1.from_checkpoints(args.dalle, args.dvae, args.clip, device)
    out = {}
    for split in SPLITS:
        res = judge_dalle1(pipe, split, args.captions, num=8, **check_dalle1_sampling(args))
        out[f"dalle1_{split}_single"], out[f"dalle1_{split}_rerank8"] = res["single"], res.get("rerank")
    return out


def evaluate_dalle2(args, device) -> dict:
    pipe = DALLE2.from_checkpoints(args.clip, args.decoder, args.prior, None, device)
    out = {}
    for split in SPLITS:
        t0 = time.time()
        res = judge_dalle2(pipe, split, args.captions, steps=50)
        out[f"dalle2_{split}_ddim50"], out[f"dalle2_{split}_ddim50_s"] = res["judge"], time.time() - t0
        out[f"dalle2_{split}_prior_cosine_to_true"] = res["prior_cosine_to_true"]
    if args.ddpm_captions > 0:
        n = args.ddpm_captions
        out[f"dalle2_val_ddim50_first{n}"] = judge_dalle2(pipe, "val", n, steps=50)["judge"]
        t0 = time.time()
        out[f"dalle2_val_ddpm1000_first{n}"] = judge_dalle2(pipe, "val", n, sampler="ddpm")["judge"]
        out[f"dalle2_val_ddpm1000_first{n}_s"] = time.time() - t0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["dalle1", "dalle2"], action="append", help="evaluate these only (repeatable)")
    for stage in ("dvae", "clip", "dalle", "prior", "decoder"):
        p.add_argument(f"--{stage}", default=f"out/{stage}/ckpt.pt", help="(default: %(default)s)")
    p.add_argument("--captions", type=int, default=200, help="captions per split (default: 200)")
    p.add_argument("--ddpm-captions", type=int, default=0,
                   help="DALL-E 2: also sample this many val captions with 1000 DDPM steps (slow on a CPU; default 0)")
    add_dalle1_sampling_args(p.add_argument_group("DALL-E 1 sampling"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    device = train_utils.pick_device(args.device)
    needs = {"dalle1": (args.dvae, args.dalle, args.clip), "dalle2": (args.clip, args.prior, args.decoder)}
    wanted = args.only or [name for name, paths in needs.items() if all(map(os.path.exists, paths))]
    if not wanted:
        raise UserError("no complete pipeline in out/: train one first (see the README), or pass checkpoint paths")
    results = {}
    for name in wanted:
        results.update({"dalle1": evaluate_dalle1, "dalle2": evaluate_dalle2}[name](args, device))
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        train_utils.write_json_atomic(results, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    train_utils.main(main)
