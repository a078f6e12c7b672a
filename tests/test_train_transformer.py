"""train_transformer.py and sample.py --pipeline dalle1 end to end, on tiny models (CPU, seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT
from nanodalle import train_utils
from nanodalle.dalle import DALLEConfig
from nanodalle.pipeline import DALLE1

DVAE_FLAGS = ["--image-size", "16", "--group-count", "2", "--n-hid", "8", "--vocab-size", "32", "--n-init", "8",
              "--batch-size", "4"]
CLIP_FLAGS = ["--image-size", "16", "--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2",
              "--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--embed-dim", "16", "--batch-size", "8"]
DALLE_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "8", "--max-images", "64",
               "--judge-captions", "4"]


def run(script, *flags, timeout=300):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A 2-step dVAE (16 px -> 8×8 codes, K = 32) and a 2-step CLIP."""
    tmp = tmp_path_factory.mktemp("upstream")
    r = run("train_dvae.py", *DVAE_FLAGS, "--steps", "2", "--out", str(tmp / "dvae"))
    assert r.returncode == 0, r.stderr
    r = run("train_clip.py", *CLIP_FLAGS, "--steps", "2", "--out", str(tmp / "clip"))
    assert r.returncode == 0, r.stderr
    return tmp


@pytest.fixture(scope="module")
def trained(upstream):
    out = upstream / "dalle"
    r = run("train_transformer.py", *DALLE_FLAGS, "--attention", "sparse", "--conv-kernel", "3", "--steps", "3",
            "--log-every", "1", "--dvae", str(upstream / "dvae/ckpt.pt"), "--clip", str(upstream / "clip/ckpt.pt"),
            "--out", str(out))
    return out, r


def test_train_transformer_end_to_end(trained, upstream):
    out, r = trained
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "log.jsonl", "metrics.json", "samples.png", "codes_train.pt", "codes_val.pt"):
        assert (out / name).is_file(), name
    ckpt = train_utils.load_checkpoint(str(out / "ckpt.pt"), "dalle")
    cfg = DALLEConfig(**ckpt["config"])
    # grid, codebook and text vocabulary come from the dVAE and the tokenizer, whatever the preset said
    assert (cfg.grid_size, cfg.image_vocab, cfg.attention) == (8, 32, "sparse")
    assert ckpt["upstream"]["dvae_hash"] and ckpt["upstream"]["dvae_config"]["vocab_size"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "val_image_loss", "judge_single", "judge_top1_rerank8", "judge_heldout_single",
                "judge_heldout_rerank8"):
        assert 0 <= metrics[key] < float("inf"), key
    cache = torch.load(out / "codes_train.pt", weights_only=True)
    assert cache["codes"].shape == (64, 64) and len(cache["captions"]) == 64
    assert int(cache["codes"].max()) < 32


def test_code_cache_is_reused_and_invalidated(trained, upstream, tmp_path):
    out, r = trained
    assert r.returncode == 0, r.stderr
    assert "encoded 64 train images" in r.stdout
    # a new run reading the same cache (copied) with the same dVAE does not encode again
    new = tmp_path / "again"
    new.mkdir()
    for name in ("codes_train.pt", "codes_val.pt"):
        (new / name).write_bytes((out / name).read_bytes())
    r2 = run("train_transformer.py", *DALLE_FLAGS, "--steps", "1", "--dvae", str(upstream / "dvae/ckpt.pt"),
             "--clip", "none", "--out", str(new))
    assert r2.returncode == 0, r2.stderr
    assert "codes: 64 train images from" in r2.stdout and "encoded" not in r2.stdout
    # another dVAE (one more step of training) makes the cache stale: it is encoded again
    other = tmp_path / "dvae2"
    (other).mkdir()
    (other / "ckpt.pt").write_bytes((upstream / "dvae/ckpt.pt").read_bytes())
    r3 = run("train_dvae.py", *DVAE_FLAGS, "--steps", "3", "--resume", "--out", str(other))
    assert r3.returncode == 0, r3.stderr
    r4 = run("train_transformer.py", *DALLE_FLAGS, "--steps", "1", "--dvae", str(other / "ckpt.pt"),
             "--clip", "none", "--out", str(tmp_path / "third"))
    assert r4.returncode == 0
    (tmp_path / "fourth").mkdir()
    for name in ("codes_train.pt", "codes_val.pt"):
        (tmp_path / "fourth" / name).write_bytes((out / name).read_bytes())
    r5 = run("train_transformer.py", *DALLE_FLAGS, "--steps", "1", "--dvae", str(other / "ckpt.pt"),
             "--clip", "none", "--out", str(tmp_path / "fourth"))
    assert r5.returncode == 0, r5.stderr
    assert "another dVAE or data set, encoding again" in r5.stdout


def test_sample_dalle1_writes_a_ranked_grid(trained, upstream, tmp_path):
    out, r = trained
    assert r.returncode == 0, r.stderr
    flags = ["--dalle", str(out / "ckpt.pt"), "--dvae", str(upstream / "dvae/ckpt.pt"), "--clip",
             str(upstream / "clip/ckpt.pt"), "--num", "4", "--keep", "2", "--out", str(tmp_path / "s")]
    r = run("sample.py", "--prompt", "a small red circle at the top", "--prompt", "a large blue star", *flags)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s/grid.png").is_file()
    assert sorted(os.listdir(tmp_path / "s")) == ["000_0.png", "000_1.png", "001_0.png", "001_1.png", "grid.png"]
    assert "best first" in r.stdout
    # the same seed gives the same images, reranked by decreasing CLIP score
    pipe = DALLE1.from_checkpoints(str(out / "ckpt.pt"), str(upstream / "dvae/ckpt.pt"),
                                   str(upstream / "clip/ckpt.pt"))
    a, sa = pipe.generate(["a small red circle at the top"], num=4, seed=5)
    b, sb = pipe.generate(["a small red circle at the top"], num=4, seed=5)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert (sa[0, :-1] >= sa[0, 1:]).all()
    # image completion: the pipeline hands the top rows of the image's codes to the transformer, which keeps them
    pipe.clip = None  # sampling order, to compare with a direct call
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    imgs, _ = pipe.generate(["a red circle"], num=2, seed=3, prompt_images=image, prompt_rows=4)
    prompt = pipe.dvae.encode(image).flatten(1)[:, :4 * 8].repeat(2, 1)  # (2, 4 rows · 8)
    text = pipe.encode_captions(["a red circle"]).repeat(2, 1)
    codes = pipe.dalle.generate(text, prompt, generator=torch.Generator().manual_seed(3))
    assert torch.equal(codes[:, :32], prompt)
    assert torch.equal(imgs[0], pipe.dvae.decode(codes.view(2, 8, 8)))


@pytest.mark.parametrize("case,flags,needle", [
    ("empty prompt", ["--prompt", "  "], "empty"),
    ("no prompt", [], "no prompt"),
    ("keep > num", ["--prompt", "a red circle", "--num", "2", "--keep", "3"], "--keep 3"),
    ("missing dalle", ["--prompt", "a red circle", "--dalle", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    ("wrong stage", ["--prompt", "a red circle", "--dalle", "DVAE"], "'dvae' checkpoint"),
    ("missing image", ["--prompt", "a red circle", "--image", "/nonexistent.png"], "/nonexistent.png"),
])
def test_sample_user_errors_are_one_line(trained, upstream, case, flags, needle):
    out, r = trained
    assert r.returncode == 0, r.stderr
    flags = [f.replace("DVAE", str(upstream / "dvae/ckpt.pt")) for f in flags]
    base = ["--dalle", str(out / "ckpt.pt"), "--dvae", str(upstream / "dvae/ckpt.pt"), "--clip", "none"]
    r = run("sample.py", *base, *flags)
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (case, r.stderr)


def test_mismatched_dvae_is_one_line_naming_both_codebooks(trained, upstream, tmp_path):
    out, r = trained
    assert r.returncode == 0, r.stderr
    r = run("train_dvae.py", *DVAE_FLAGS, "--vocab-size", "64", "--steps", "1", "--out", str(tmp_path / "d64"))
    assert r.returncode == 0, r.stderr
    r = run("sample.py", "--prompt", "a red circle", "--dalle", str(out / "ckpt.pt"), "--dvae",
            str(tmp_path / "d64/ckpt.pt"), "--clip", "none", "--out", str(tmp_path / "s"))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert line.startswith("error:") and "\n" not in line and "64 codes" in line and "32 codes" in line


def test_train_transformer_user_errors(upstream, tmp_path):
    r = run("train_transformer.py", *DALLE_FLAGS, "--dvae", "/nonexistent/dvae.pt", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "/nonexistent/dvae.pt" in r.stderr and "Traceback" not in r.stderr
    r = run("train_transformer.py", *DALLE_FLAGS, "--dvae", str(upstream / "clip/ckpt.pt"), "--out",
            str(tmp_path / "y"))
    assert r.returncode == 2 and "'clip' checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = run("train_transformer.py", "--size", "full", "--dry-run")
    assert r.returncode == 0 and "total:" in r.stdout
