"""Tests for nanodalle/train_utils.py (the shared training runtime) and train_dvae.py end to end.

Pure functions are checked against closed forms (LR schedule, EMA recursion, grid geometry); the
runtime is checked through train_dvae.py in subprocesses (outputs, user errors, kill and --resume) and
through a 2-process gloo DDP run on the CPU. Models are tiny (16 px, n_hid 8, K 32) and every process
runs on one thread, so the file takes well under a minute on a 2-core CPU.
"""
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import ENV, ROOT, leave_together
from nanodalle import UserError, checkpoint, dvae, flags, train_utils
from nanodalle.dvae import DVAE, DVAEConfig, PRESETS, cosine
from nanodalle.transformer import Attention
import train_dvae

TINY = ["--image-size", "16", "--group-count", "2", "--n-hid", "8", "--vocab-size", "32", "--n-init", "8",
        "--batch-size", "4"]




def run_dvae(*flags, timeout=120):
    return subprocess.run([sys.executable, "train_dvae.py", *flags], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# LR schedule


@pytest.mark.parametrize("lr, warmup, steps, min_frac", [(1.0, 10, 100, 0.1), (3e-4, 20, 1000, 0.0),
                                                         (2e-3, 1, 7, 0.5)])
def test_lr_schedule(lr, warmup, steps, min_frac):
    lrs = [train_utils.lr_at(s, lr, warmup, steps, min_frac) for s in range(steps + 5)]
    # linear warm-up: lr · (s + 1) / warmup, equal increments, peak lr at the last warm-up step
    for s in range(warmup):
        assert math.isclose(lrs[s], lr * (s + 1) / warmup, rel_tol=1e-12)
    assert math.isclose(lrs[warmup - 1], lr, rel_tol=1e-12)
    assert math.isclose(lrs[warmup], lr, rel_tol=1e-12)  # the cosine starts at the peak
    assert max(lrs) <= lr * (1 + 1e-12)
    # the cosine, in closed form, reaches lr · min_lr_frac at step `steps` and stays there
    for s in range(warmup, steps + 5):
        t = min((s - warmup) / (steps - warmup), 1.0)
        assert math.isclose(lrs[s], lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))),
                            rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(lrs[steps], lr * min_frac, rel_tol=1e-12, abs_tol=1e-15)
    # the last optimizer step (steps − 1, counting from 0) is within one cosine step of the floor
    assert lrs[steps - 1] - lr * min_frac <= lr * (1 - min_frac) * (1 - math.cos(math.pi / (steps - warmup))) / 2 + 1e-15
    # monotone non-increasing after warm-up
    after = lrs[warmup - 1:]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_lr_schedule_without_warmup():
    assert train_utils.lr_at(0, 1e-3, 0, 100, 0.1) == 1e-3
    assert math.isclose(train_utils.lr_at(50, 1e-3, 0, 100, 0.1), 1e-3 * (0.1 + 0.9 * 0.5), rel_tol=1e-12)


# ----------------------------------------------------------------------------------------------------
# optimizer groups and EMA


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(4, 3, 3)
        self.scale = nn.Parameter(torch.ones(()))  # a 0-d scalar
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_configure_optimizers_decays_only_matrices():
    m = Mixed()
    opt = train_utils.configure_optimizers(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.1, 0.0}
    assert groups[0.1] == {id(m.emb.weight), id(m.lin.weight), id(m.conv.weight)}
    assert groups[0.0] == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias), id(m.conv.bias), id(m.scale)}
    # every trainable parameter exactly once; frozen ones not at all
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in m.parameters() if p.requires_grad)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-3 for g in opt.param_groups)


def test_ema_matches_closed_form_recursion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    decay = 0.9
    ema = train_utils.EMA(model, decay)
    names = [n for n, _ in model.named_parameters()]
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}  # starts at the weights
    for n_update in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves BatchNorm's running statistics (buffers)
        ema.update(model)
        d = min(decay, (1 + n_update) / (10 + n_update))
        for n, p in model.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    assert ema.updates == 30
    ema_params = dict(ema.model.named_parameters())
    for n in names:
        torch.testing.assert_close(ema_params[n].double(), ref[n], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ema_params[n], dict(model.named_parameters())[n])  # it is an average
        assert not ema_params[n].requires_grad
    for (n, b_ema), b in zip(ema.model.named_buffers(), model.buffers()):  # buffers are copied, not averaged
        assert torch.equal(b_ema, b), n
    assert not ema.model.training


def test_ema_first_update_uses_warmup_decay():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = train_utils.EMA(model, 0.9999)
    with torch.no_grad():
        model.weight.fill_(11.0)
    ema.update(model)  # d = min(0.9999, 2/11): ema = 2/11 · 0 + 9/11 · 11 = 9
    torch.testing.assert_close(ema.model.weight, torch.full((2, 2), 9.0))


# ----------------------------------------------------------------------------------------------------
# checkpoints


def test_save_atomic_survives_a_crash_during_save(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"step": 1, "w": torch.arange(5.0)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(5.0))
    before = sha256(path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:  # half a file, then the "kill"
            fh.write(b"PK\x03\x04 partial bytes")
        raise RuntimeError("simulated crash in torch.save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sha256(path) == before
    assert torch.load(path, weights_only=True)["step"] == 1
    # a later save replaces it
    checkpoint.save_atomic({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_load_checkpoint_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nothing" / "ckpt.pt")
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(missing, "dvae")
    assert missing in str(e.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all\n" * 10)
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(str(garbage), "dvae")
    assert str(garbage) in str(e.value)

    not_ours = tmp_path / "not_ours.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, not_ours)  # a torch file, but not a nanodalle checkpoint
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(str(not_ours), "dvae")
    assert str(not_ours) in str(e.value)

    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(str(a_list), "dvae")
    assert str(a_list) in str(e.value)

    clip = tmp_path / "clip.pt"
    torch.save({"format": 1, "stage": "clip", "model": {}}, clip)
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(str(clip), "dvae")
    msg = str(e.value)
    assert str(clip) in msg and "clip" in msg.replace(str(clip), "") and "dvae" in msg.replace(str(clip), "")
    assert checkpoint.load_checkpoint(str(clip), "clip")["stage"] == "clip"


# ----------------------------------------------------------------------------------------------------
# command line


def dvae_parser(train_defaults=None):
    return flags.make_parser("dvae", "test", DVAEConfig, PRESETS,
                             train_defaults if train_defaults is not None else {"toy": dict(steps=7, batch_size=5)})


def test_config_from_args_unknown_preset():
    args = dvae_parser().parse_args(["--size", "nope"])
    with pytest.raises(UserError) as e:
        flags.config_from_args(DVAEConfig, PRESETS, args)
    assert "nope" in str(e.value) and "toy" in str(e.value)


def test_config_from_args_overrides_win_over_preset():
    args = dvae_parser().parse_args(["--n-hid", "8", "--kl-weight", "0.5", "--hard", "true", "--recon",
                                     "logit_laplace", "--steps", "11"])
    cfg = flags.config_from_args(DVAEConfig, PRESETS, args)
    expected = {**dataclasses.asdict(DVAEConfig()), **PRESETS["toy"], "n_hid": 8, "kl_weight": 0.5,
                "hard": True, "recon": "logit_laplace"}
    assert dataclasses.asdict(cfg) == expected
    assert isinstance(cfg.n_hid, int) and isinstance(cfg.kl_weight, float)
    # training settings: a flag wins over the preset's training default, which wins over the global one
    assert args.steps == 11 and args.batch_size == 5 and args.lr == 3e-4
    assert args.warmup == 11 // 50 and args.eval_every == max(11 // 4, 1)
    # another preset, no overrides: exactly the preset
    args = dvae_parser().parse_args(["--size", "small"])
    assert dataclasses.asdict(flags.config_from_args(DVAEConfig, PRESETS, args)) == \
        {**dataclasses.asdict(DVAEConfig()), **PRESETS["small"]}
    assert args.steps == 1000 and args.batch_size == 32
    with pytest.raises(SystemExit):  # a malformed bool is an argparse error (exit 2), not a crash
        dvae_parser().parse_args(["--hard", "maybe"])


# ----------------------------------------------------------------------------------------------------
# devices and images


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_cuda_unavailable_is_user_error():
    with pytest.raises(UserError) as e:
        train_utils.pick_device("cuda")
    assert "--device cpu" in str(e.value)
    assert train_utils.pick_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        assert train_utils.pick_device("auto") == torch.device("cpu")


def test_auto_dtype_on_the_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_utils, "cpu_has_bf16", lambda: True)  # e.g. AMD Zen 4, Intel Sapphire Rapids
    assert train_utils.pick_dtype("auto", cpu) == torch.bfloat16
    assert train_utils.pick_dtype("float32", cpu) == torch.float32  # asked for: always honoured
    monkeypatch.setattr(train_utils, "cpu_has_bf16", lambda: False)  # emulated bf16 would be slower
    assert train_utils.pick_dtype("auto", cpu) == torch.float32
    assert train_utils.pick_dtype("bfloat16", cpu) == torch.bfloat16


def test_bf16_training_attention_on_the_cpu_is_written_out_and_equals_sdpa(monkeypatch):
    """Under CPU autocast with gradients, Attention takes the written-out path (bf16 matmuls), not the fused
    kernel; it computes the same function."""
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            y_sdpa = attn(x, causal=True)  # no gradients: the fused kernel

        def refuse(*args, **kwargs):
            raise AssertionError("the fused kernel was called while training in bf16 on the CPU")
        monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
        y = attn(x, causal=True)
    assert y.requires_grad and y.dtype == y_sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_sdpa.float(), atol=2e-2, rtol=2e-2)  # bf16 rounding, 3 digits


def test_save_grid_geometry_and_values(tmp_path):
    N, C, H, W, nrow, pad = 5, 3, 4, 6, 3, 2
    torch.manual_seed(0)
    images = torch.rand(N, C, H, W) * 2 - 1
    images[0] = -1.0
    images[1] = 1.0
    images[2, :, 0, 0] = torch.tensor([5.0, -5.0, 0.0])  # out of range: clamped
    path = tmp_path / "grid.png"
    train_utils.save_grid(images, str(path), nrow=nrow, pad=pad)
    img = Image.open(path)
    rows = math.ceil(N / nrow)
    assert img.size == (nrow * (W + pad) + pad, rows * (H + pad) + pad) == (26, 14)
    assert img.mode == "RGB"
    a = np.array(img).astype(np.int64)  # (rows·(H+pad)+pad, ..., C)
    for i in range(N):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        tile = a[top:top + H, left:left + W].transpose(2, 0, 1)  # (C, H, W)
        expected = (images[i].clamp(-1, 1).double().numpy() + 1) * 127.5
        assert np.abs(tile - expected).max() <= 0.5 + 1e-4, i
    assert (a[:2] == 255).all() and (a[:, :2] == 255).all()               # the padding is white
    assert (a[2:2 + H, 2:2 + W] == 0).all()                               # -1 -> 0
    assert (a[2:2 + H, 2 + W + pad:2 + 2 * W + pad] == 255).all()          # +1 -> 255
    assert tuple(a[2, 2 * (W + pad) + 2]) == (255, 0, 128)                 # 5, -5, 0 -> 255, 0, 128 (127.5 rounds to even)
    assert (a[2 + H + pad:, 2 + 2 * (W + pad):] == 255).all()              # the empty sixth slot is white
    # grayscale, and fewer images than nrow: the grid is only as wide as needed
    train_utils.save_grid(torch.zeros(2, 1, 5, 5), str(tmp_path / "g.png"), nrow=8, pad=2)
    g = Image.open(tmp_path / "g.png")
    assert g.mode == "L" and g.size == (2 * 7 + 2, 7 + 2)


# ----------------------------------------------------------------------------------------------------
# train_dvae.py end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny train_dvae.py run: (its OUT directory, the finished process)."""
    out = tmp_path_factory.mktemp("dvae") / "run"
    r = run_dvae(*TINY, "--steps", "3", "--log-every", "1", "--eval-every", "3", "--out", str(out))
    return out, r


def test_train_dvae_end_to_end(trained):
    out, r = trained
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for name in ("ckpt.pt", "log.jsonl", "metrics.json", "recon.png"):
        assert (out / name).is_file(), name
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # no temp files left behind

    log = read_log(out / "log.jsonl")
    assert [rec["step"] for rec in log] == [1, 2, 3]
    for rec in log:
        assert {"step", "loss", "lr", "grad_norm", "ms_per_step", "items_per_s"} <= set(rec)
        assert all(math.isfinite(rec[k]) for k in ("loss", "lr", "grad_norm", "ms_per_step", "items_per_s"))
        assert rec["ms_per_step"] > 0 and rec["items_per_s"] > 0
    # lr of step s (1-based in the log) is lr_at(s − 1) of the toy preset's settings
    for rec in log:
        toy = train_dvae.TRAIN["toy"]
        expected = train_utils.lr_at(rec["step"] - 1, toy["lr"], 3 // 50, 3, toy["min_lr_frac"])
        assert math.isclose(rec["lr"], expected, rel_tol=1e-9)

    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "dvae")
    assert {"format", "stage", "config", "model", "ema", "optimizer", "step", "rng"} <= set(ckpt)
    assert ckpt["format"] == 1 and ckpt["stage"] == "dvae" and ckpt["step"] == 3
    cfg = DVAEConfig(**ckpt["config"])
    assert (cfg.image_size, cfg.group_count, cfg.n_hid, cfg.vocab_size, cfg.n_init) == (16, 2, 8, 32, 8)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = checkpoint.model_from_checkpoint(ckpt, DVAEConfig, DVAE)

    # metrics.json, recomputed independently from the saved weights on the first 512 val images
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "mse", "perplexity", "codes_used_frac"} <= set(metrics) and metrics["step"] == 3
    from nanodalle import shapes
    val = torch.stack([torch.from_numpy(shapes.example(i, "val", 16)[0].transpose(2, 0, 1).astype(np.float32)
                                        / 127.5 - 1) for i in range(512)])
    with torch.no_grad():
        codes = model.encode(val)
        mse = ((model.decode(codes) - val) / 2).pow(2).mean().item()
    assert math.isclose(metrics["mse"], mse, rel_tol=1e-4)
    assert math.isclose(metrics["psnr"], 10 * math.log10(1 / mse), rel_tol=1e-4)
    counts = torch.bincount(codes.flatten(), minlength=32).double()
    p = counts[counts > 0] / counts.sum()
    assert math.isclose(metrics["perplexity"], math.exp(-(p * p.log()).sum().item()), rel_tol=1e-6)
    assert math.isclose(metrics["codes_used_frac"], (counts > 0).double().mean().item(), rel_tol=1e-6)
    # judge_recon: the judge, one reconstruction at a time, against the scene each val image shows
    with torch.no_grad():  # in batches of 128, as the script does, so the pixels agree to the bit
        recons = torch.cat([model.decode(codes[i:i + 128]) for i in range(0, 512, 128)])
    passed = [shapes.judge(recons[i], shapes.example(i, "val", 16)[2])["full"] for i in range(512)]
    assert math.isclose(metrics["judge_recon"], sum(passed) / 512, abs_tol=1e-9)

    # recon.png: 32 held-out images and their reconstructions, as 8 rows of 8 at 16 px with 2 px padding
    assert Image.open(out / "recon.png").size == (8 * 18 + 2, 8 * 18 + 2)


ERROR_CASES = {
    # name: (flags, put a valid dvae checkpoint in OUT first?)
    "missing data": (["--data", "/nonexistent", "--resume"], True),
    "missing data, new run": (["--data", "/nonexistent"], False),
    "empty data folder": (["--data", "{empty}", "--resume"], True),
    "unknown preset": (["--size", "nope", "--resume"], True),
    "resume without checkpoint": (["--resume"], False),
    "wrong-stage checkpoint": (["--resume"], "clip"),
    "existing checkpoint without --resume": ([], True),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_train_dvae_user_errors(case, trained, tmp_path):
    flags, existing = ERROR_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    flags = [f.format(empty=tmp_path / "empty") for f in flags]
    ckpt = out / "ckpt.pt"
    if existing is True:
        assert trained[1].returncode == 0
        ckpt.write_bytes((trained[0] / "ckpt.pt").read_bytes())
    elif existing == "clip":
        torch.save({"format": 1, "stage": "clip", "config": {}, "model": {}, "step": 5}, ckpt)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    before = {p.name: sha256(p) for p in out.iterdir()}

    r = run_dvae(*TINY, "--steps", "3", "--out", str(out), *flags)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert {p.name: sha256(p) for p in out.iterdir() if p.name in before} == before  # nothing lost
    if not existing:
        assert not ckpt.exists()
    msg = lines[0]
    if case.startswith("missing data"):
        assert "/nonexistent" in msg
    elif case == "empty data folder":
        assert str(tmp_path / "empty") in msg
    elif case == "unknown preset":
        assert "nope" in msg
    elif case == "resume without checkpoint":
        assert str(ckpt) in msg
    elif case == "wrong-stage checkpoint":
        assert str(ckpt) in msg and "'clip'" in msg and "'dvae'" in msg
    else:
        assert str(ckpt) in msg and "--resume" in msg


def test_train_dvae_kill_and_resume(tmp_path):
    out = tmp_path / "out"
    flags = [*TINY, "--steps", "400", "--eval-every", "5", "--log-every", "5", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "train_dvae.py", *flags], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint and step >= 10 in the log after 90 s"
            if (out / "ckpt.pt").exists() and (out / "log.jsonl").exists():
                try:
                    steps = [rec["step"] for rec in read_log(out / "log.jsonl")]
                except json.JSONDecodeError:  # a line being written right now
                    steps = []
                if steps and max(steps) >= 10:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "dvae")  # the kill left a loadable checkpoint
    S = ckpt["step"]
    assert S > 0 and S % 5 == 0
    # the log may run past the checkpoint (a step logged, then killed before its save): resume drops those
    n_old = len([rec for rec in read_log(out / "log.jsonl") if rec["step"] <= S])

    r = run_dvae(*TINY, "--steps", str(S + 10), "--eval-every", "5", "--log-every", "5", "--out", str(out),
                 "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {S}" in r.stdout
    final = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "dvae")
    assert final["step"] == S + 10
    assert any(not torch.equal(final["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    new = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[n_old:]]
    assert [rec["step"] for rec in new] == [S + 5, S + 10]


def test_train_dvae_resume_uses_the_checkpoints_config(trained, tmp_path):
    """Trainer: "the run's own config wins over flags" -- so --resume alone must work for a non-default run."""
    assert trained[1].returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((trained[0] / "ckpt.pt").read_bytes())  # step 3 of a 16 px, n_hid 8 run
    r = run_dvae("--resume", "--steps", "4", "--batch-size", "4", "--out", str(out))  # no model flags
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "dvae")
    assert ckpt["step"] == 4 and ckpt["config"]["n_hid"] == 8 and ckpt["config"]["image_size"] == 16


# ----------------------------------------------------------------------------------------------------
# DDP: 2 processes, gloo, CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dvae_loss_fn(cfg):
    """train_dvae.py's loss, written the same way."""
    def loss_fn(model, batch, step):
        images, _ = batch
        tau = cosine(step, cfg.temp_start, cfg.temp_end, cfg.temp_steps)
        beta = cosine(step, 0.0, cfg.kl_weight, cfg.kl_warmup)
        loss, _ = model(images, tau, beta)
        return loss, {"tau": tau, "beta": beta}
    return loss_fn


def deterministic_relaxation(logits, tau, hard=False, dim=1):
    """softmax(logits / τ): gumbel_softmax without the noise, so two ways of batching can agree exactly."""
    return F.softmax(logits / tau, dim=dim)


def fixed_batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def make_trainer(out, steps, extra=()):
    args = flags.make_parser("dvae", "test", DVAEConfig, PRESETS, {}).parse_args(
        [*TINY, "--steps", str(steps), "--log-every", "1", "--eval-every", "1000", "--device", "cpu",
         "--diversity-weight", "0",  # a statistic of each rank's own batch: DDP != one big batch there
         "--dtype", "float32",  # DDP against one process to 1e-5: bfloat16 rounds differently per batch split
         "--out", str(out), *extra])
    cfg = flags.config_from_args(DVAEConfig, PRESETS, args)
    return train_utils.Trainer(args, "dvae", cfg, DVAE), cfg


def _ddp_worker(rank, tmp, ports):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    # A: the real DVAE loss (with Gumbel noise), different data on each rank, 3 steps
    trainer, cfg = make_trainer(f"{tmp}/a", 3)
    assert trainer.distributed and trainer.world_size == 2 and trainer.master == (rank == 0)
    torch.save(trainer.raw_model.state_dict(), f"{tmp}/init{rank}.pt")
    g = torch.Generator().manual_seed(100 + rank)

    def batches():
        while True:
            yield torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, None

    trainer.fit(batches(), dvae_loss_fn(cfg))
    torch.save(trainer.raw_model.state_dict(), f"{tmp}/rank{rank}.pt")
    # B: one step without noise on a fixed batch per rank, to compare with one process on both batches
    os.environ["MASTER_PORT"] = str(ports[1])
    dvae.gumbel_softmax = deterministic_relaxation
    trainer, cfg = make_trainer(f"{tmp}/b", 1)
    x = fixed_batch(200 + rank)
    trainer.fit(iter([(x, None)]), dvae_loss_fn(cfg))
    torch.save(trainer.raw_model.state_dict(), f"{tmp}/b_rank{rank}.pt")
    leave_together(tmp, rank)  # fit() has torn the process group down


def test_ddp_two_processes_gloo(tmp_path, monkeypatch):
    mp.spawn(_ddp_worker, args=(str(tmp_path), (free_port(), free_port())), nprocs=2, join=True)
    init0, init1 = torch.load(tmp_path / "init0.pt"), torch.load(tmp_path / "init1.pt")
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(init0[k], init1[k]) for k in init0)      # the same start (seed + DDP broadcast)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert any(not torch.equal(w0[k], init0[k]) for k in w0)       # and it trained
    # the master wrote the raw module's state, not the DDP wrapper's
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"), "dvae")
    assert ckpt["step"] == 3 and all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)
    log = read_log(tmp_path / "a" / "log.jsonl")
    assert [rec["step"] for rec in log] == [1, 2, 3]
    assert log[0]["items_per_s"] > 0

    # B: DDP averages the gradients, so 2 ranks × 4 images == 1 process × the 8 images
    monkeypatch.setattr(dvae, "gumbel_softmax", deterministic_relaxation)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    trainer, cfg = make_trainer(tmp_path / "single", 1, ["--batch-size", "8"])
    assert not trainer.distributed
    x = torch.cat([fixed_batch(200), fixed_batch(201)])
    trainer.fit(iter([(x, None)]), dvae_loss_fn(cfg))
    ddp_norm = read_log(tmp_path / "b" / "log.jsonl")[0]["grad_norm"]
    single_norm = read_log(tmp_path / "single" / "log.jsonl")[0]["grad_norm"]
    assert math.isclose(ddp_norm, single_norm, rel_tol=1e-4), (ddp_norm, single_norm)  # a sum would be 2x
    b0, b1 = torch.load(tmp_path / "b_rank0.pt"), torch.load(tmp_path / "b_rank1.pt")
    single = trainer.raw_model.state_dict()
    for k in single:
        assert torch.equal(b0[k], b1[k]), k
        torch.testing.assert_close(b0[k], single[k], atol=1e-6, rtol=1e-5)


def test_evaluation_runs_in_eval_mode_without_gradients_and_restores_the_mode(tmp_path):
    trainer, cfg = make_trainer(tmp_path / "run", 2)
    model = trainer.eval_model()
    seen = []

    def evaluate(step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        return {"x": 1.0}

    trainer.fit(iter([(fixed_batch(0), None), (fixed_batch(1), None)]), dvae_loss_fn(cfg), evaluate)
    assert seen == [(2, False, False)]  # called once, at the last step, in eval mode with no autograd
    assert model.training and torch.is_grad_enabled()

    def fails(step):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        trainer.run_evaluation(fails)
    assert model.training  # restored even when the evaluation raises
