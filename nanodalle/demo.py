"""`make demo`: train every toy stage on the built-in shapes, then sample, each step run as a user would.

    python -m nanodalle.demo            # what `make demo` runs; delete out/ to start from scratch

A stage whose checkpoint is complete (its step has reached its planned steps) is skipped, and says so; one
that was interrupted is resumed with --resume. Outputs: out/<stage>/ for each stage, out/demo/dalle1.png and
out/demo/dalle2.png (one row per prompt each).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

from nanodalle import UserError, train_utils

# (name, command): run in order; each later stage reads the checkpoints of the earlier ones from out/
STAGES = [
    ("dvae", ["train_dvae.py"]),
    ("clip", ["train_clip.py"]),
    ("dalle", ["train_transformer.py"]),
    ("prior", ["train_prior.py"]),
    ("decoder", ["train_decoder.py", "--ddpm-captions", "0"]),  # the 1000-step DDPM judge is for Results
    ("upsampler", ["train_decoder.py", "--stage", "upsampler"]),
]
PROMPTS = ["a small red circle at the top", "a large blue square on the left", "a small green triangle in the center",
           "there is a large yellow star on the right", "a small purple heart at the bottom on a white background",
           "a large orange cross above a small cyan circle"]


def complete(path: str) -> bool:
    """Has the run that wrote this checkpoint reached its last step?"""
    if not os.path.exists(path):
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return ckpt["step"] >= ckpt["steps"]


def run(cmd: list[str]) -> float:
    t0 = time.time()
    r = subprocess.run([sys.executable, *cmd])
    if r.returncode != 0:
        raise UserError(f"`python {' '.join(cmd)}` failed (exit {r.returncode}): see its message above")
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.parse_args()
    times = {}
    for name, cmd in STAGES:
        ckpt = f"out/{name}/ckpt.pt"
        if complete(ckpt):
            print(f"== {name}: {ckpt} is complete, skipping (delete out/{name} to retrain)")
            continue
        resume = ["--resume"] if os.path.exists(ckpt) else []
        print(f"== {name}: python {' '.join(cmd + resume)}", flush=True)
        times[name] = run(cmd + resume)
    os.makedirs("out/demo", exist_ok=True)
    args = [a for prompt in PROMPTS for a in ("--prompt", prompt)]
    print("== sampling DALL-E 1", flush=True)
    times["sample dalle1"] = run(["sample.py", *args, "--num", "8", "--out", "out/demo/dalle1"])
    os.replace("out/demo/dalle1/grid.png", "out/demo/dalle1.png")
    print("DALL-E 1 samples (one row per prompt, CLIP-best first): out/demo/dalle1.png")
    print("== sampling DALL-E 2", flush=True)
    times["sample dalle2"] = run(["sample.py", "--pipeline", "dalle2", *args, "--num", "8", "--out", "out/demo/dalle2"])
    os.replace("out/demo/dalle2/grid.png", "out/demo/dalle2.png")
    print("DALL-E 2 samples (one row per prompt, prior -> decoder -> upsampler): out/demo/dalle2.png")
    for name, seconds in times.items():
        print(f"  {name}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    train_utils.main(main)
