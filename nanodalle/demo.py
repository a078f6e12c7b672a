"""`make demo`: train every toy stage on the built-in shapes, then sample, each step run as a user would.

    python -m nanodalle.demo            # what `make demo` runs; delete out/ to start from scratch

A stage whose checkpoint is complete (its step has reached its planned steps) is skipped, and says so; one
that was interrupted is resumed with --resume. Outputs: out/<stage>/ for each stage, out/demo/dalle1.png and
out/demo/dalle2.png (one row per prompt each), out/demo/eval.json (python -m nanodalle.evaluate on 100 captions
per split) and out/demo/report.md (every stage's time and final metrics, the evaluation, the two grids).
"""
import argparse
import json
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
    ("dalle", ["train_transformer.py", "--judge-captions", "0"]),  # the evaluation step judges the pipelines
    ("prior", ["train_prior.py"]),
    ("decoder", ["train_decoder.py", "--judge-captions", "0"]),  # the evaluation step judges the pipeline
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


def overall(done: int, total: int, t0: float) -> str:
    """The overall progress line between steps: [#####-----] 3/9 steps, 34.0 min so far."""
    bar = "#" * round(20 * done / total) + "-" * (20 - round(20 * done / total))
    return f"[{bar}] {done}/{total} steps, {(time.time() - t0) / 60:.1f} min so far"


def write_report(path: str, times: dict, metrics: dict, evaluation: dict) -> None:
    """out/demo/report.md: a row per step (its minutes in this run, or "skipped", and its final metrics), the
    evaluation table, and the two grids."""
    lines = ["# nanodalle demo report", "", "| step | minutes | final metrics |", "|---|---|---|"]
    for name in [n for n, _ in STAGES] + [n for n in times if n not in dict(STAGES)]:
        minutes = f"{times[name] / 60:.1f}" if name in times else "skipped (complete)"
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.get(name, {}).items())
        lines.append(f"| {name} | {minutes} | {shown} |")
    lines += ["", "## Evaluation (python -m nanodalle.evaluate)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()]
    lines += ["", "![DALL-E 1](dalle1.png)", "", "![DALL-E 2](dalle2.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.parse_args()
    times, t0 = {}, time.time()
    total = len(STAGES) + 3  # the stages, two samplings, the evaluation
    for i, (name, cmd) in enumerate(STAGES):
        ckpt = f"out/{name}/ckpt.pt"
        if complete(ckpt):
            print(f"== {name}: {ckpt} is complete, skipping (delete out/{name} to retrain)")
            continue
        resume = ["--resume"] if os.path.exists(ckpt) else []
        print(f"== {overall(i, total, t0)} | {name}: python {' '.join(cmd + resume)}", flush=True)
        times[name] = run(cmd + resume)
    os.makedirs("out/demo", exist_ok=True)
    args = [a for prompt in PROMPTS for a in ("--prompt", prompt)]
    print(f"== {overall(len(STAGES), total, t0)} | sampling DALL-E 1", flush=True)
    times["sample dalle1"] = run(["sample.py", *args, "--num", "8", "--out", "out/demo/dalle1"])
    os.replace("out/demo/dalle1/grid.png", "out/demo/dalle1.png")
    print("DALL-E 1 samples (one row per prompt, CLIP-best first): out/demo/dalle1.png")
    print(f"== {overall(len(STAGES) + 1, total, t0)} | sampling DALL-E 2", flush=True)
    times["sample dalle2"] = run(["sample.py", "--pipeline", "dalle2", *args, "--num", "8", "--out", "out/demo/dalle2"])
    os.replace("out/demo/dalle2/grid.png", "out/demo/dalle2.png")
    print("DALL-E 2 samples (one row per prompt, prior -> decoder -> upsampler): out/demo/dalle2.png")
    print(f"== {overall(len(STAGES) + 2, total, t0)} | evaluating every stage", flush=True)
    times["evaluate"] = run(["-m", "nanodalle.evaluate", "--captions", "100", "--json", "out/demo/eval.json"])
    metrics = {}
    for name, _ in STAGES:
        if os.path.exists(f"out/{name}/metrics.json"):
            with open(f"out/{name}/metrics.json") as f:
                metrics[name] = json.load(f)
    with open("out/demo/eval.json") as f:
        evaluation = json.load(f)
    write_report("out/demo/report.md", times, metrics, evaluation)
    print(f"== {overall(total, total, t0)} | report: out/demo/report.md")
    for name, seconds in times.items():
        print(f"  {name}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    train_utils.main(main)
