"""Tests for nanodalle/sharding.py (FSDP, activation checkpointing, sharded checkpoints) and memory.py.

The distributed tests run two gloo processes on the CPU (torch.multiprocessing, one thread each) through the
real Trainer with a tiny DALL-E transformer: FSDP must train exactly like DDP, and a sharded checkpoint must
come back — resumed under FSDP, loaded by one process, consolidated into a plain file — as the same weights,
which sample the same image tokens as the model had in memory before it was saved.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, leave_together, run_script
from nanodalle import UserError, checkpoint, flags, memory, sharding, train_utils
from nanodalle.clip import CLIP, CLIPConfig
from nanodalle.dalle import DALLE, DALLEConfig, PRESETS
from nanodalle.diffusion import GaussianDiffusion
from nanodalle.dvae import DVAE, DVAEConfig
from nanodalle.prior import DiffusionPrior, PriorConfig
from nanodalle.unet import UNet, UNetConfig
from test_train_utils import free_port, read_log

TINY_DALLE = ["--text-len", "6", "--text-vocab", "20", "--pad-id", "19", "--grid-size", "3", "--image-vocab",
              "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--attention", "full"]


def dalle_batches(rank: int):
    """One fixed (text, codes) batch per rank, different between ranks, repeated: a loss that can go down."""
    g = torch.Generator().manual_seed(1000 + rank)
    text, codes = torch.randint(19, (4, 6), generator=g), torch.randint(16, (4, 9), generator=g)
    while True:
        yield text, codes


def dalle_loss(model, batch, step):
    text, codes = batch
    loss, text_loss, image_loss = model(text, codes)
    return loss, {"image_loss": image_loss.detach()}


def make_dalle_trainer(out, steps, extra=()):
    args = flags.make_parser("dalle", "test", DALLEConfig, PRESETS, {}).parse_args(
        [*TINY_DALLE, "--steps", str(steps), "--log-every", "1", "--eval-every", "2", "--device", "cpu",
         "--lr", "1e-2", "--warmup", "0", "--ema", "0.5", "--out", str(out), *extra,
         "--dtype", "float32"])  # FSDP vs DDP to 1e-4: in bf16 FSDP casts the parameters, DDP the products
    cfg = flags.config_from_args(DALLEConfig, PRESETS, args)
    return train_utils.Trainer(args, "dalle", cfg, DALLE)


def sample_tokens(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    text = torch.tensor([[1, 2, 3, 19, 19, 19], [4, 5, 19, 19, 19, 19]])
    return model.eval().generate(text, generator=g)  # (2, 9)


def _worker(rank, tmp, ports):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    runs = [("ddp", []), ("fsdp", ["--fsdp"]), ("fsdp_ckpt", ["--fsdp", "--grad-ckpt"])]
    for (name, flags), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        trainer = make_dalle_trainer(f"{tmp}/{name}", 3, flags)
        seen = []
        trainer.fit(dalle_batches(rank), dalle_loss, lambda step: seen.append(step) or {"seen": float(step)})
        assert seen == ([2, 3] if rank == 0 else []), seen  # the master evaluates the gathered model
    # after training: the weights the sharded run had in memory, gathered, and the tokens they sample
    os.environ["MASTER_PORT"] = str(ports[3])
    trainer = make_dalle_trainer(f"{tmp}/fsdp", 3, ["--fsdp", "--resume"])  # loads the sharded checkpoint
    assert trainer.step == 3 and sharding.is_sharded(trainer.raw_model)
    full = sharding.full_state_dict(trainer.raw_model)  # every rank takes part
    full_ema = sharding.full_state_dict(trainer.ema.model)
    if rank == 0:
        torch.save({"model": full, "ema": full_ema}, f"{tmp}/resumed.pt")
    torch.distributed.barrier()  # both ranks done before rank 0, which hosts the store, tears down
    torch.distributed.destroy_process_group()
    leave_together(tmp, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    mp.spawn(_worker, args=(str(tmp), [free_port() for _ in range(4)]), nprocs=2, join=True)
    return tmp


def test_fsdp_trains_like_ddp(runs):
    ddp = read_log(runs / "ddp" / "log.jsonl")
    for name in ("fsdp", "fsdp_ckpt"):
        sharded = read_log(runs / name / "log.jsonl")
        assert [r["step"] for r in sharded] == [1, 2, 3]
        for a, b in zip(ddp, sharded):
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (name, a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), name
    assert ddp[2]["loss"] < ddp[0]["loss"]  # lr 1e-2: it learns within 3 steps


def test_sharded_checkpoint_layout(runs):
    out = runs / "fsdp"
    assert not (out / "ckpt.pt").exists()  # nothing was gathered into a plain file
    assert (out / "sharded" / "latest").read_text().strip() == "step_00000003"
    assert sorted(os.listdir(out / "sharded")) == ["latest", "step_00000003"]  # step 2 removed, no .tmp left
    meta = sharding.read_meta(str(out / "sharded" / "step_00000003"))
    assert meta["stage"] == "dalle" and meta["step"] == 3 and meta["has_ema"]
    # what a script reads before its Trainer (the tokenizer): the sharded run's meta.pt
    from types import SimpleNamespace
    state = checkpoint.resume_state(SimpleNamespace(resume=True, out=str(out)), "dalle")
    assert state["step"] == 3 and "model" not in state
    assert checkpoint.resume_state(SimpleNamespace(resume=True, out=str(out)), "clip") is None


def test_save_load_consolidate_sample_same_tokens(runs, tmp_path):
    resumed = torch.load(runs / "resumed.pt", weights_only=True)  # gathered after a 2-process FSDP resume
    ddp = checkpoint.load_checkpoint(str(runs / "ddp" / "ckpt.pt"), "dalle")
    for k, v in ddp["model"].items():  # FSDP after 3 steps == DDP after 3 steps
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-5, rtol=1e-4)
    dest = sharding.consolidate(str(runs / "fsdp"), str(tmp_path / "plain.pt"))
    ckpt = checkpoint.load_checkpoint(dest, "dalle")
    assert ckpt["step"] == 3 and ckpt["optimizer"] is None
    for part in ("model", "ema"):
        assert all(torch.equal(resumed[part][k], ckpt[part][k]) for k in ckpt[part]), part
    before = checkpoint.model_from_checkpoint({**ckpt, "model": resumed["model"]}, DALLEConfig, DALLE, False)
    after = checkpoint.model_from_checkpoint(ckpt, DALLEConfig, DALLE, use_ema=False)
    tokens = sample_tokens(before)
    assert torch.equal(tokens, sample_tokens(after))
    ema_before = checkpoint.model_from_checkpoint({**ckpt, "ema": resumed["ema"]}, DALLEConfig, DALLE)
    assert torch.equal(sample_tokens(ema_before), sample_tokens(checkpoint.model_from_checkpoint(
        ckpt, DALLEConfig, DALLE)))
    # one process without torchrun reads the 2-rank checkpoint too (DCP reshards on load)
    model = DALLE(DALLEConfig(**ckpt["config"]))
    sharding.load_sharded(sharding.latest_sharded(str(runs / "fsdp")), model)
    assert torch.equal(sample_tokens(model), tokens)


def test_consolidate_command_and_errors(runs, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(runs / "fsdp", out)
    r = run_script("sample.py", "--pipeline", "dalle1", "--dalle", str(out / "ckpt.pt"), "--prompt", "x")
    assert r.returncode == 2 and "python -m nanodalle.sharding --consolidate" in r.stderr, r.stderr
    r = run_script("-m", "nanodalle.sharding", "--consolidate", str(out))
    assert r.returncode == 0 and (out / "ckpt.pt").exists(), r.stderr
    r = run_script("-m", "nanodalle.sharding", "--consolidate", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no sharded checkpoint" in r.stderr


def test_fsdp_user_errors(tmp_path):
    r = run_script("train_clip.py", "--fsdp", "--out", str(tmp_path / "a"), "--steps", "1")
    assert r.returncode == 2 and "torchrun" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_script("train_clip.py", "--cpu-offload", "--out", str(tmp_path / "a"), "--steps", "1")
    assert r.returncode == 2 and "--fsdp" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------------
# activation checkpointing: the same gradients, model by model

def _models():
    return [
        ("dalle", DALLE(DALLEConfig(text_len=6, text_vocab=20, pad_id=19, grid_size=3, image_vocab=16, n_layer=2,
                                    n_head=2, n_embd=32, dropout=0.1)), None),
        ("clip", CLIP(CLIPConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                                 text_width=32, text_layers=2, text_heads=2, context_length=8, vocab_size=30,
                                 eot_id=28, embed_dim=16)), None),
        ("prior", DiffusionPrior(PriorConfig(embed_dim=16, text_len=5, text_width=8, n_layer=2, n_head=2,
                                             n_embd=32, dropout=0.1)), None),
        ("decoder", UNet(UNetConfig(image_size=16, base_channels=16, channel_mults="1,2", attention_resolutions="8",
                                    head_channels=16, clip_dim=16, text_vocab=30, text_len=6, text_width=16,
                                    pad_id=29, dropout=0.1)), None),
        ("dvae", DVAE(DVAEConfig(image_size=16, group_count=2, n_hid=8, vocab_size=32, n_init=8)), None),
    ]


@pytest.mark.parametrize("stage, model, _", _models(), ids=[m[0] for m in _models()])
def test_grad_ckpt_gives_the_same_gradients(stage, model, _):
    cfg = model.cfg

    def grads(m):
        torch.manual_seed(0)  # the batch, the diffusion step and noise, the dropout masks
        loss = memory.example_loss(stage, m.train(), cfg, 3, "cpu")
        m.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss, plain = grads(model)
    assert len(sharding.blocks(model)) > 0
    loss_ckpt, recomputed = grads(sharding.checkpoint_blocks(model))
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == recomputed.keys()
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], atol=1e-5, rtol=0, msg=n)
    assert list(model.state_dict()) == list(type(model)(cfg).state_dict())  # names unchanged


def test_grad_ckpt_survives_a_deep_copy():
    """EMA deep-copies the model: the copy's blocks must recompute with the copy's weights, not the original's."""
    import copy
    model = sharding.checkpoint_blocks(DALLE(DALLEConfig(text_len=6, text_vocab=20, pad_id=19, grid_size=3,
                                                         image_vocab=16, n_layer=2, n_head=2, n_embd=32)))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    text, codes = torch.randint(19, (2, 6)), torch.randint(16, (2, 9))
    plain = DALLE(model.cfg)
    plain.load_state_dict(twin.state_dict())
    assert torch.equal(twin(text, codes)[0], plain(text, codes)[0])


# ----------------------------------------------------------------------------------------------------
# memory plan, and MPS-friendly dtypes

def test_memory_plan_counts():
    cfg = DALLEConfig(**{**PRESETS["toy"], "n_layer": 2})
    p8 = memory.plan("dalle", DALLE, cfg, 4, 8, bf16=False, ema=True, grad_ckpt=False)
    N = sum(t.numel() for t in DALLE(cfg).parameters())
    assert p8["params"] == N
    assert (p8["ddp"]["weights"], p8["ddp"]["gradients"], p8["ddp"]["AdamW state"], p8["ddp"]["EMA"]) == \
        (4 * N, 4 * N, 8 * N, 4 * N)
    assert p8["fsdp"]["AdamW state"] == 8 * N / 8 and p8["fsdp"]["weights"] == 4 * N / 8
    assert p8["fsdp"]["activations"] == p8["ddp"]["activations"]  # activations do not shard
    with torch.device("meta"):
        model = DALLE(cfg)
    acts, acts8, acts12 = (memory.activation_bytes("dalle", model, cfg, B) for B in (4, 8, 12))
    # linear in the batch, plus a little that is not per sample (the attention mask)
    assert acts12["full"] - acts8["full"] == acts8["full"] - acts["full"] > 0.99 * acts["full"]
    assert acts["grad_ckpt"] < acts["full"]
    # at least the logits and each block's input, each (B, T, ·) float32: a lower bound from the shapes
    T = cfg.text_len + cfg.grid_size ** 2
    assert acts["full"] > 4 * 4 * T * (cfg.n_layer * cfg.n_embd + cfg.image_vocab)
    assert memory.plan("dalle", DALLE, cfg, 4, 8, True, False, False)["ddp"]["activations"] == acts["full"] / 2


def test_dry_run_prints_the_plan():
    r = run_script("train_transformer.py", "--size", "full", "--dry-run", "--world-size", "64")
    assert r.returncode == 0, r.stderr
    assert "12,195,306,752 parameters" in r.stdout  # the paper's "12B"
    assert "DDP:" in r.stdout and "does NOT fit in 80 GB" in r.stdout
    assert "FSDP:" in r.stdout and "FSDP: " in r.stdout.split("DDP:")[1]


def test_no_float64_on_the_device():
    """MPS has no float64: every parameter and buffer of every model (schedules included) is float32."""
    for stage, model, _ in _models():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            assert t.dtype != torch.float64, (stage, name)
    diffusion = GaussianDiffusion(1000, "cosine")
    assert all(b.dtype != torch.float64 for b in diffusion.buffers())
