"""Tests for nanodalle/clip.py and train_clip.py: the full-size parameter count (ViT-L/14, 427.6M), the
symmetric contrastive loss against an independent numpy computation, the clipped logit scale, reading the
text features at the end-of-text token, unit-norm embeddings, zero-shot classification and reranking
against a hand computation, a 2-process DDP step against one process on the whole batch, and train_clip.py
end to end. Models are tiny and run on one thread, so the file takes well under a minute on a 2-core CPU.
"""
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ENV, ROOT, leave_together
from nanodalle import checkpoint, data, evaluate
from nanodalle.clip import CLIP, CLIPConfig, contrastive_loss, eot_positions, load_clip
from nanodalle.tokenizer import Tokenizer

TINY = dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
            text_layers=2, text_heads=2, context_length=12, vocab_size=50, eot_id=48, embed_dim=16)
TINY_FLAGS = ["--image-size", "16", "--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2",
              "--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--embed-dim", "16",
              "--batch-size", "8"]




def tiny_model(seed=0, **kw) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(**{**TINY, **kw}))


def np_symmetric_ce(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """CLIP Figure 3 in float64 numpy: (CE over rows + CE over columns) / 2 of scale · img @ txtᵀ."""
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T

    def log_softmax(z, axis):
        z = z - z.max(axis=axis, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    n = len(logits)
    loss_i = -np.mean([log_softmax(logits, 1)[i, i] for i in range(n)])
    loss_t = -np.mean([log_softmax(logits, 0)[i, i] for i in range(n)])
    return (loss_i + loss_t) / 2


def random_tokens(model, B, T, gen, lengths=None):
    """(B, T) tokens in [0, eot) with an eot at each row's length, and pad-like junk (< vocab) after it."""
    cfg = model.cfg
    tokens = torch.randint(0, cfg.eot_id, (B, T), generator=gen)
    lengths = lengths if lengths is not None else torch.randint(1, T, (B,), generator=gen).tolist()
    for b, n in enumerate(lengths):
        tokens[b, n] = cfg.eot_id
    return tokens, lengths


# ----------------------------------------------------------------------------------------------------
# sizes


def test_full_dry_run_param_count():
    r = subprocess.run([sys.executable, "train_clip.py", "--size", "full", "--dry-run"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    total = int(re.search(r"^total: ([\d,]+) parameters", r.stdout, re.M).group(1).replace(",", ""))
    assert abs(total - 427.6e6) / 427.6e6 < 0.02, total  # open_clip's table: ViT-L-14 427.6M
    cfg = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1])
    assert (cfg["vocab_size"], cfg["context_length"], cfg["embed_dim"]) == (49408, 77, 768)  # the preset's


# ----------------------------------------------------------------------------------------------------
# the loss


def test_loss_equals_numpy_symmetric_cross_entropy():
    model = tiny_model()
    model.logit_scale.data.fill_(math.log(12.5))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    tokens, _ = random_tokens(model, 6, 12, g)
    loss = model(images, tokens)
    img, txt = model.encode_image(images).detach(), model.encode_text(tokens).detach()
    expected = np_symmetric_ce(img.numpy(), txt.numpy(), 12.5)
    assert loss.dim() == 0 and math.isclose(loss.item(), expected, rel_tol=1e-5), (loss.item(), expected)
    # the function on its own, on features that are not the model's (a gathered DDP batch, say)
    a = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=-1)
    got = contrastive_loss(a, b, torch.tensor(math.log(3.0))).item()
    assert math.isclose(got, np_symmetric_ce(a.numpy(), b.numpy(), 3.0), rel_tol=1e-5)
    # the two directions differ in general: a loss over rows only would fail here
    rows_only = torch.nn.functional.cross_entropy(3.0 * a @ b.t(), torch.arange(9)).item()
    assert abs(rows_only - got) > 1e-3
    # under bf16 autocast (training's default on CPU) bf16 features give the float32 loss of those same values,
    # at the largest inverse temperature, 100 (bf16 logits put this loss of ~42 off by ~0.01)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        got16 = contrastive_loss(a16, b16, torch.tensor(math.log(100.0)))
    assert got16.dtype == torch.float32
    expected16 = np_symmetric_ce(a16.float().numpy(), b16.float().numpy(), 100.0)
    assert math.isclose(got16.item(), expected16, rel_tol=1e-5), (got16.item(), expected16)


def test_loss_with_hard_negatives_equals_independent_computation():
    """Negative captions join each image's softmax (NegCLIP §5); the captions' side is the plain loss."""
    g = torch.Generator().manual_seed(1)
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=-1) for n in (7, 7, 4))
    got = contrastive_loss(img, txt, torch.tensor(math.log(4.0)), neg).item()
    logits_i = 4.0 * img.double() @ torch.cat([txt, neg]).double().t()  # (7, 11)
    logits_t = 4.0 * txt.double() @ img.double().t()  # (7, 7)
    loss_i = -np.mean([(logits_i[i, i] - torch.logsumexp(logits_i[i], 0)).item() for i in range(7)])
    loss_t = -np.mean([(logits_t[i, i] - torch.logsumexp(logits_t[i], 0)).item() for i in range(7)])
    assert math.isclose(got, (loss_i + loss_t) / 2, rel_tol=1e-5)
    # a negative equal to an image's own caption halves that image's probability: the loss must rise
    harder = contrastive_loss(img, txt, torch.tensor(math.log(4.0)), txt[:4]).item()
    assert harder > contrastive_loss(img, txt, torch.tensor(math.log(4.0))).item() + 0.1
    # the model's forward encodes and appends them
    model = tiny_model()
    images = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    tokens, _ = random_tokens(model, 5, 12, g)
    negatives, _ = random_tokens(model, 5, 12, g)
    expected = contrastive_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale,
                                model.encode_text(negatives))
    assert torch.allclose(model(images, tokens, negative_tokens=negatives), expected)


def test_logit_scale_init_and_clip_at_100():
    model = tiny_model()
    assert math.isclose(model.scale().item(), 1 / 0.07, rel_tol=1e-5)  # CLIP §2.5
    model.logit_scale.data.fill_(50.0)  # exp(50) ≈ 5e21
    assert model.scale().item() == pytest.approx(100.0, rel=1e-6)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    tokens, _ = random_tokens(model, 4, 10, g)
    loss = model(images, tokens)
    expected = np_symmetric_ce(model.encode_image(images).detach().numpy(),
                               model.encode_text(tokens).detach().numpy(), 100.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # clipped: no gradient pushes it further


# ----------------------------------------------------------------------------------------------------
# the encoders


def test_text_features_are_read_at_end_of_text():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    tokens, lengths = random_tokens(model, 5, 12, g, lengths=[1, 3, 6, 10, 11])
    assert eot_positions(tokens, model.cfg.eot_id).tolist() == lengths
    base = model.encode_text(tokens).detach()
    # changing what follows the eot (the padding) changes nothing, whatever the caption's length
    after = tokens.clone()
    for b, n in enumerate(lengths):
        after[b, n + 1:] = torch.randint(0, model.cfg.vocab_size, (12 - n - 1,), generator=g)
    assert not torch.equal(after, tokens)
    torch.testing.assert_close(model.encode_text(after), base, atol=1e-6, rtol=0)
    # a shorter row (fewer padding positions) gives the same features too
    torch.testing.assert_close(model.encode_text(tokens[:1, :4]), base[:1], atol=1e-6, rtol=0)
    # changing a token before the eot changes that row only
    before = tokens.clone()
    before[3, 5] = (before[3, 5] + 1) % model.cfg.eot_id
    out = model.encode_text(before).detach()
    assert (out[3] - base[3]).abs().max() > 1e-4
    torch.testing.assert_close(out[[0, 1, 2, 4]], base[[0, 1, 2, 4]], atol=1e-6, rtol=0)
    # the feature is the eot position's output: rows sharing a prefix but not its eot differ
    longer = tokens[2:3].clone()
    longer[0, 6] = 7
    longer[0, 7] = model.cfg.eot_id
    assert (model.encode_text(longer) - base[2]).abs().max() > 1e-4


def test_embeddings_are_unit_norm_and_shaped():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(7, 3, 16, 16, generator=g) * 2 - 1
    tokens, _ = random_tokens(model, 5, 12, g)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    assert img.shape == (7, 16) and txt.shape == (5, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.zeros(1, 13, dtype=torch.long))


def test_zero_shot_classify_and_rank_by_hand():
    tok = Tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    g = torch.Generator().manual_seed(4)
    images = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    with pytest.raises(RuntimeError, match="tokenizer"):
        model.zero_shot_classify(images, ["a red circle"])
    model.tokenizer = tok
    assert "tokenizer" not in " ".join(model.state_dict())
    prompts = ["a red circle", "a blue square", ["a green star", "a large green star on the left"]]
    img = model.encode_image(images)
    txt = model.encode_text(tok.encode_batch(["a red circle", "a blue square", "a green star",
                                              "a large green star on the left"], 12))
    # by hand, in float64 numpy: a list scores the log of its prompts' mean probability under the softmax
    logits = model.scale().item() * (img @ txt.t()).detach().double().numpy()  # (6, 4)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.stack([p[:, 0], p[:, 1], (p[:, 2] + p[:, 3]) / 2], 1).argmax(1)  # (6, 3) -> (6,)
    pred = model.zero_shot_classify(images, prompts)
    assert pred.shape == (6,) and pred.dtype == torch.long
    assert pred.tolist() == expected.tolist()
    # one prompt per class: the nearest prompt
    single = model.zero_shot_classify(images, ["a red circle", "a blue square", "a green star"])
    assert single.tolist() == (img @ txt[:3].t()).argmax(1).tolist()
    # rank: N candidates against one caption, cosine similarities
    scores = model.rank(images, "a blue square")
    assert scores.shape == (6,)
    torch.testing.assert_close(scores, (img @ txt[1]).detach(), atol=1e-6, rtol=0)
    assert scores.argmax().item() == int(np.argmax((img @ txt[1]).detach().numpy()))


# ----------------------------------------------------------------------------------------------------
# DDP: the global contrastive batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_batch(seed, B=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1
    tokens, _ = random_tokens(tiny_model(), B, 12, g)
    negatives, _ = random_tokens(tiny_model(), B, 12, g)  # hard-negative captions (gathered too)
    return images, tokens, negatives


def _ddp_worker(rank, tmp, port):
    import train_clip
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    images, tokens, negatives = ddp_batch(100 + rank)
    loss = model(images, tokens, gather=train_clip.gather_features, negative_tokens=negatives)
    loss.backward()
    grads = {k: p.grad for k, p in model.module.named_parameters()}
    torch.save({"loss": loss.item(), "grads": grads}, f"{tmp}/rank{rank}.pt")
    dist.barrier()  # both ranks done before rank 0, which hosts the store, tears down (else exit can hang)
    dist.destroy_process_group()
    leave_together(tmp, rank)


def test_ddp_gather_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    model = tiny_model()
    (i0, t0, n0), (i1, t1, n1) = ddp_batch(100), ddp_batch(101)
    loss = model(torch.cat([i0, i1]), torch.cat([t0, t1]), negative_tokens=torch.cat([n0, n1]))
    loss.backward()
    assert math.isclose(r0["loss"], loss.item(), rel_tol=1e-6) and math.isclose(r1["loss"], loss.item(), rel_tol=1e-6)
    # a per-rank loss (4 pairs, not 8) would differ
    assert not math.isclose(model(i0, t0, negative_tokens=n0).item(), loss.item(), rel_tol=1e-3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][name], r1["grads"][name], atol=0, rtol=0)  # DDP's all-reduce
        torch.testing.assert_close(r0["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------
# train_clip.py end to end


def run_clip(*flags, timeout=120):
    return subprocess.run([sys.executable, "train_clip.py", *flags], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_train_clip_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_clip(*TINY_FLAGS, "--steps", "3", "--log-every", "1", "--eval-every", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "vocab_size" not in r.stdout  # the toy preset already matches the shipped tokenizer
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ("t2i_top1_100", "i2t_top1_100", "zeroshot_color", "zeroshot_shape", "zeroshot_position")
    assert set(keys) <= set(metrics) and metrics["step"] == 3
    assert all(0 <= metrics[k] <= 1 for k in keys)
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "clip")
    assert ckpt["tokenizer"] == Tokenizer().state() and ckpt["step"] == 3
    assert checkpoint.load_checkpoint(str(out), "clip")["step"] == 3  # the run's directory stands for its ckpt.pt
    model = load_clip(str(out / "ckpt.pt"))
    assert model.cfg.image_size == 16 and model.cfg.vision_width == 32
    assert model.tokenizer.eot_id == model.cfg.eot_id
    assert model.zero_shot_classify(torch.zeros(2, 3, 16, 16), ["a red circle", "a blue star"]).shape == (2,)
    # retrieval recomputed from the saved weights on the first 1000 val pairs
    import train_clip
    from nanodalle.shapes import ShapesDataset
    images, captions = data.first_pairs(ShapesDataset("val", 16), 1000)
    img, txt = evaluate.embed_pairs(model, images, model.tokenizer.encode_batch(captions, model.cfg.context_length))
    t2i, i2t = evaluate.retrieval_top1(img, txt)
    assert math.isclose(t2i, metrics["t2i_top1_100"], abs_tol=1e-9) and math.isclose(i2t, metrics["i2t_top1_100"])


def test_train_clip_on_an_image_folder_reports_retrieval_only(tmp_path):
    from PIL import Image
    from nanodalle import data
    folder = tmp_path / "imgs"
    folder.mkdir()
    n_val = n_train = 0
    for i in range(3000):  # the split is by a hash of the name (1% val): write 24 train and 6 val pairs
        is_val = data.in_split(f"img{i}", "val", 10)
        if (is_val and n_val == 6) or (not is_val and n_train == 24):
            continue
        n_val, n_train = n_val + is_val, n_train + (not is_val)
        color = tuple(int(c) for c in np.random.default_rng(i).integers(0, 256, 3))
        Image.new("RGB", (20, 20), color).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i}\n")
    assert (n_val, n_train) == (6, 24)
    out = tmp_path / "run"
    r = run_clip(*TINY_FLAGS, "--data", str(folder), "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"t2i_top1_100", "i2t_top1_100"} <= set(metrics)
    assert not any(k.startswith("zeroshot") for k in metrics)
    # 6 pairs: one chunk of 6, so the accuracies are multiples of 1/6
    assert all(abs(metrics[k] * 6 - round(metrics[k] * 6)) < 1e-9 for k in ("t2i_top1_100", "i2t_top1_100"))


def test_retrieval_top1_by_hand():
    import train_clip
    # 4 pairs in chunks of 2: chunk 0 is right both ways, in chunk 1 caption 3 prefers image 2
    img = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0]])
    t2i, i2t = evaluate.retrieval_top1(img, txt, chunk=2)
    assert t2i == 3 / 4  # caption 3: image 2 (1.0) beats image 3 (0.6)
    assert i2t == 3 / 4  # image 3: caption 2 and 3 tie at 0.6; argmax takes the first, caption 2


def test_train_clip_vocab_override_prints_one_line(tmp_path):
    r = run_clip(*TINY_FLAGS, "--vocab-size", "100", "--steps", "1", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if "vocab_size" in l]
    assert len(lines) == 1 and "100 -> 4098" in lines[0]
    assert load_clip(str(tmp_path / "v" / "ckpt.pt")).cfg.vocab_size == 4098


@pytest.mark.parametrize("flags, needle", [
    (["--size", "nope"], "nope"),
    (["--tokenizer", "/nonexistent/x.tiktoken"], "/nonexistent/x.tiktoken"),
    (["--text-len", "99"], "--text-len 99"),
    (["--patch-size", "5"], "--patch-size 5"),
    (["--data", "/nonexistent"], "/nonexistent"),
])
def test_train_clip_user_errors(tmp_path, flags, needle):
    r = run_clip(*TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "e"), *flags)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
