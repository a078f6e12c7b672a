"""train_decoder.py (decoder and upsampler), the DALL-E 2 pipeline and sample.py --pipeline dalle2, on tiny
models (CPU, seconds)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_script
from nanodalle import checkpoint
from nanodalle.pipeline import DALLE2, decoder_model_fn, slerp
from nanodalle.unet import UNet, UNetConfig
from test_prior import CLIP_FLAGS, PRIOR_FLAGS

import train_decoder

DECODER_FLAGS = ["--image-size", "16", "--base-channels", "16", "--channel-mults", "1,2", "--attention-resolutions",
                 "8", "--head-channels", "16", "--text-width", "16", "--text-layers", "1", "--text-heads", "2",
                 "--batch-size", "4", "--sample-steps", "3", "--log-every", "1", "--ddpm-captions", "0"]
UPSAMPLER_FLAGS = ["--stage", "upsampler", "--image-size", "32", "--low-res-size", "16", "--train-crop", "16",
                   "--base-channels", "16", "--channel-mults", "1,2", "--batch-size", "4", "--sample-steps", "3"]


def one_line_error(r, needle):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


# ----------------------------------------------------------------------------------------------------
# the pieces

def test_gaussian_blur_matches_a_hand_written_convolution():
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    sigma = 0.6
    w = np.exp(-np.array([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = np.zeros(x.shape)
    for dy in range(3):
        for dx in range(3):
            expected += w[dy] * w[dx] * padded[:, :, dy:dy + 7, dx:dx + 9]
    assert np.allclose(train_decoder.gaussian_blur(x, sigma).numpy(), expected, atol=1e-6)
    flat = torch.full((1, 3, 5, 5), 0.3)
    assert torch.allclose(train_decoder.gaussian_blur(flat, sigma), flat)  # the weights sum to 1
    assert torch.equal(train_decoder.gaussian_blur(x, 0.0), x)


def test_upsampler_crops_cover_the_same_pixels():
    # a 32 px image made of 2×2 blocks: its 16 px version is exact, so aligned crops must agree pixel for pixel
    low_truth = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    images = low_truth.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (3, 3, 32, 32)
    cfg = UNetConfig(image_size=32, low_res=True, low_res_size=16, train_crop=8, blur_sigma=0.0)
    x0, low = train_decoder.upsampler_batch(images, cfg, torch.Generator().manual_seed(0))
    assert x0.shape == (3, 3, 8, 8) and low.shape == (3, 3, 4, 4)
    assert torch.allclose(x0[:, :, ::2, ::2], low, atol=1e-6)
    # without a crop, the whole image and its blurred low-res version
    cfg.train_crop, cfg.blur_sigma = 0, 0.6
    x0, low = train_decoder.upsampler_batch(images, cfg, None)
    assert torch.equal(x0, images)
    assert torch.allclose(low, train_decoder.gaussian_blur(low_truth, 0.6), atol=1e-6)


def test_psnr_closed_form():
    a = torch.zeros(1, 3, 4, 4)
    assert math.isclose(train_decoder.psnr(a + 0.1, a), 10 * math.log10(4 / 0.01), rel_tol=1e-6)


def test_slerp_walks_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.3)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(4), atol=1e-5)
    angle = torch.arccos((a * b).sum(-1))
    assert torch.allclose(torch.arccos((a * mid).sum(-1).clamp(-1, 1)), 0.3 * angle, atol=1e-4)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, base_channels=8, channel_mults="1,2", attention_resolutions="4", head_channels=8,
                     clip_dim=6, text_vocab=20, text_len=5, text_width=8, text_layers=1, text_heads=2, pad_id=19)
    model = UNet(cfg).eval()
    for p in model.parameters():  # zero-initialised outputs would make every prediction 0: perturb all
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def test_decoder_guidance_is_uncond_plus_scale_times_the_difference():
    model = tiny_unet()
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    tokens = torch.tensor([[1, 2, 3, 19, 19], [4, 5, 19, 19, 19], [6, 7, 8, 9, 10]])
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5, 500, 999])
    yes, no = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        cond = model(x, t, emb, tokens, drop_clip=yes, drop_text=yes)
        uncond = model(x, t, emb, tokens, drop_clip=no, drop_text=no)
        assert torch.allclose(decoder_model_fn(model, emb, tokens, 1.0)(x, t), cond, atol=1e-6)
        assert torch.allclose(decoder_model_fn(model, emb, tokens, 3.0)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)
        # no caption: the text is dropped in both halves; no z_i: null_clip in both
        no_text = model(x, t, emb, tokens, drop_clip=yes, drop_text=no)
        assert torch.allclose(decoder_model_fn(model, emb, None, 1.0)(x, t), no_text, atol=1e-6)
        no_clip = model(x, t, emb, tokens, drop_clip=no, drop_text=yes)
        assert torch.allclose(decoder_model_fn(model, None, tokens, 1.0)(x, t), no_clip, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step CLIP, a 2-step prior, a 3-step decoder (judged with the prior) and a 2-step upsampler."""
    tmp = tmp_path_factory.mktemp("decoder")
    clip = str(tmp / "clip/ckpt.pt")
    runs = {}
    runs["clip"] = run_script("train_clip.py", *CLIP_FLAGS, "--steps", "2", "--out", str(tmp / "clip"))
    runs["prior"] = run_script("train_prior.py", *PRIOR_FLAGS, "--steps", "2", "--clip", clip,
                               "--out", str(tmp / "prior"))
    runs["decoder"] = run_script("train_decoder.py", *DECODER_FLAGS, "--steps", "3", "--clip", clip,
                                 "--prior", str(tmp / "prior/ckpt.pt"), "--judge-captions", "8",
                                 "--out", str(tmp / "decoder"), timeout=600)
    runs["upsampler"] = run_script("train_decoder.py", *UPSAMPLER_FLAGS, "--steps", "2",
                                   "--out", str(tmp / "upsampler"))
    return tmp, runs


def test_train_decoder_end_to_end(trained):
    tmp, runs = trained
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
    out = tmp / "decoder"
    for name in ("ckpt.pt", "log.jsonl", "metrics.json", "samples.png"):
        assert (out / name).is_file(), name
    assert "clip_dim 128 -> 16" in runs["decoder"].stdout  # a fact of the CLIP, not the preset's
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), "decoder")
    assert ckpt["ema"] is not None and ckpt["upstream"]["clip_hash"] and "tokenizer" in ckpt
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3
    for key in ("val_mse", "judge_true_emb", "judge_ddim50", "prior_cosine_to_true"):
        assert key in metrics, key
    assert 0 <= metrics["judge_ddim50"] <= 1 and -1 <= metrics["prior_cosine_to_true"] <= 1
    for key in ("judge_true_emb", "judge_ddim50"):  # --judge-captions 8: a whole number of 8 captions passed
        assert abs(metrics[key] * 8 - round(metrics[key] * 8)) < 1e-9, key
    assert Image.open(out / "samples.png").size == (8 * 18 + 2, 2 * 18 + 2)  # 2 rows of 8 16-px images, 2 px apart
    up = json.loads((tmp / "upsampler/metrics.json").read_text())
    assert up["psnr_bilinear"] > 15 and "psnr_upsampled" in up
    up_ckpt = checkpoint.load_checkpoint(str(tmp / "upsampler/ckpt.pt"), "upsampler")
    assert up_ckpt["config"]["low_res"] and up_ckpt["config"]["clip_dim"] == 0


def test_pipeline_is_deterministic_and_upsamples(trained):
    tmp, _ = trained
    pipe = DALLE2.from_checkpoints(str(tmp / "clip/ckpt.pt"), str(tmp / "decoder/ckpt.pt"),
                                   str(tmp / "prior/ckpt.pt"), str(tmp / "upsampler/ckpt.pt"))
    a = pipe.generate(["a small red circle at the top", "a large blue star"], num=2, seed=3, steps=3)
    b = pipe.generate(["a small red circle at the top", "a large blue star"], num=2, seed=3, steps=3)
    assert a.shape == (2, 2, 3, 32, 32) and torch.equal(a, b)
    assert a.abs().max() <= 1
    c = pipe.generate(["a small red circle at the top"], num=1, seed=4, steps=3, upsample=False)
    assert c.shape == (1, 1, 3, 16, 16)


def test_sample_dalle2_modes(trained, tmp_path):
    tmp, _ = trained
    base = ["--pipeline", "dalle2", "--clip", str(tmp / "clip/ckpt.pt"), "--prior", str(tmp / "prior/ckpt.pt"),
            "--decoder", str(tmp / "decoder/ckpt.pt"), "--upsampler", str(tmp / "upsampler/ckpt.pt"), "--steps", "3"]
    r = run_script("sample.py", *base, "--prompt", "a small red circle", "--prompt", "a big green star", "--num", "3",
                   "--out", str(tmp_path / "grid"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid/grid.png").size == (3 * 34 + 2, 2 * 34 + 2)
    assert Image.open(tmp_path / "grid/001_2.png").size == (32, 32)
    image = str(tmp_path / "grid/000_0.png")
    for flags, name, size in ((["--variations", image, "--num", "2"], "variations.png", (3 * 34 + 2, 2 * 34 + 2)),
                              (["--interpolate", image, str(tmp_path / "grid/001_0.png"), "--frames", "3"],
                               "interpolation.png", (5 * 34 + 2, 34 + 2)),
                              (["--text-diff", "a red circle", "a blue circle", "--image", image, "--frames", "3"],
                               "text_diff.png", (4 * 34 + 2, 34 + 2)),
                              (["--no-prior", "--prompt", "a red circle", "--num", "1", "--upsampler", "none"],
                               "grid.png", (16, 16))):
        out = tmp_path / name.replace(".png", "")
        r = run_script("sample.py", *base, *flags, "--out", str(out))
        assert r.returncode == 0, (flags, r.stderr)
        got = Image.open(out / name).size
        assert got == size or (name == "grid.png" and Image.open(out / "000_0.png").size == size), (name, got)


def test_user_errors(trained, tmp_path):
    tmp, _ = trained
    base = ["--pipeline", "dalle2", "--clip", str(tmp / "clip/ckpt.pt"), "--prior", str(tmp / "prior/ckpt.pt"),
            "--decoder", str(tmp / "decoder/ckpt.pt"), "--upsampler", "none", "--out", str(tmp_path / "x")]
    one_line_error(run_script("sample.py", *base, "--text-diff", "a", "b"), "--image")
    one_line_error(run_script("sample.py", *base, "--variations", "/nonexistent.png"), "/nonexistent.png")
    one_line_error(run_script("sample.py", *base, "--prompt", "a red circle", "--steps", "1"), "--steps 1")
    one_line_error(run_script("sample.py", *base, "--prompt", " "), "empty")
    one_line_error(run_script("sample.py", *base[:-4], "--decoder", str(tmp / "prior/ckpt.pt"), "--prompt", "a"),
                   "'prior' checkpoint")
    # an upsampler made for another size
    one_line_error(run_script("sample.py", *base[:-4], "--upsampler", str(tmp / "decoder/ckpt.pt"), "--prompt", "a"),
                   "'decoder' checkpoint")
    r = run_script("train_decoder.py", *DECODER_FLAGS, "--clip", "/nonexistent/clip.pt", "--out", str(tmp_path / "y"))
    one_line_error(r, "/nonexistent/clip.pt")
    r = run_script("train_decoder.py", *UPSAMPLER_FLAGS, "--train-crop", "7", "--out", str(tmp_path / "z"))
    one_line_error(r, "--train-crop 7")
    r = run_script("train_decoder.py", *DECODER_FLAGS, "--schedule-shift", "0", "--out", str(tmp_path / "s"))
    one_line_error(r, "schedule shift")
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_full_presets_dry_run():
    r = run_script("train_decoder.py", "--size", "full", "--dry-run")
    assert r.returncode == 0 and "total: 3,29" in r.stdout, r.stdout[-500:]
    r = run_script("train_decoder.py", "--stage", "upsampler", "--size", "full", "--dry-run")
    assert r.returncode == 0 and "total: 67" in r.stdout, r.stdout[-500:]


def test_evaluate_dalle2(trained, tmp_path):
    tmp, _ = trained
    r = run_script("-m", "nanodalle.evaluate", "--only", "dalle2", "--clip", str(tmp / "clip/ckpt.pt"), "--prior",
                   str(tmp / "prior/ckpt.pt"), "--decoder", str(tmp / "decoder/ckpt.pt"), "--captions", "2",
                   "--ddpm-captions", "1", "--json", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    for key in ("dalle2_val_ddim50", "dalle2_heldout_ddim50", "dalle2_val_prior_cosine_to_true",
                "dalle2_val_ddpm1000_first1", "dalle2_val_ddim50_first1"):
        assert key in res, key
    assert res["dalle2_val_ddim50"] in (0.0, 0.5, 1.0)  # 2 captions
    assert "| dalle2_val_ddim50 |" in r.stdout
    one_line_error(run_script("-m", "nanodalle.evaluate", "--only", "dalle2", "--decoder", "/nonexistent.pt",
                              "--clip", str(tmp / "clip/ckpt.pt")), "/nonexistent.pt")


def small_folder(root, n_train=10, n_val=2):
    """A folder of n_train + n_val noise pictures with free-text captions: keys picked so that exactly n_val
    of them fall in the validation split (fewer than the 8 images of a samples grid)."""
    from nanodalle.data import in_split
    root.mkdir()
    rng, train, val, i = np.random.default_rng(0), 0, 0, 0
    while train < n_train or val < n_val:
        key, i = f"photo{i:04d}", i + 1
        is_val = in_split(key, "val", 10)
        if (is_val and val == n_val) or (not is_val and train == n_train):
            continue
        val, train = val + is_val, train + (not is_val)
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / f"{key}.jpg")
        (root / f"{key}.txt").write_text(f"Photo #{i}: a café at dusk, seen from the street\n")
    return root


def test_decoder_and_upsampler_train_on_a_small_folder(trained, tmp_path):
    """Real data comes as a folder: both stages train and evaluate on one whose validation split holds
    only 2 images (the samples grids must not assume 8), with captions in no shapes vocabulary."""
    tmp, _ = trained
    folder = str(small_folder(tmp_path / "photos"))
    r = run_script("train_decoder.py", *DECODER_FLAGS, "--data", folder, "--steps", "2", "--clip",
                   str(tmp / "clip/ckpt.pt"), "--out", str(tmp_path / "decoder"))
    assert r.returncode == 0, r.stderr
    assert "judge_true_emb" not in json.loads((tmp_path / "decoder/metrics.json").read_text())  # shapes only
    assert Image.open(tmp_path / "decoder/samples.png").size == (2 * 18 + 2, 2 * 18 + 2)  # 2 val images, 2 rows
    r = run_script("train_decoder.py", *UPSAMPLER_FLAGS, "--data", folder, "--steps", "2",
                   "--out", str(tmp_path / "upsampler"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "upsampler/samples.png").size == (2 * 34 + 2, 4 * 34 + 2)  # 4 rows of 2 32-px
