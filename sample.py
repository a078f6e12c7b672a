"""Draw images for captions with the trained models.

    python sample.py --prompt "a small red circle at the top"               # DALL-E 1, the toy checkpoints in out/
    python sample.py --prompt "a large blue star on the left" --num 32 --keep 8 --temperature 0.9
    python sample.py --prompts-file captions.txt --dalle run/ckpt.pt --dvae dvae/ckpt.pt --clip clip/ckpt.pt
    python sample.py --prompt "a green square below a red heart" --image photo.png --prompt-rows 3
    python sample.py --pipeline dalle2 --prompt "a small red circle at the top" --num 4 --steps 50 --guidance 3
    python sample.py --pipeline dalle2 --variations photo.png --num 6
    python sample.py --pipeline dalle2 --interpolate a.png b.png
    python sample.py --pipeline dalle2 --text-diff "a red circle" "a blue circle" --image photo.png
    python sample.py --pipeline dalle2 --no-prior --prompt "a large green star"        # GLIDE-style

DALL-E 1 (--pipeline dalle1): each caption gets --num candidates from the transformer, decoded by the dVAE and
ranked by CLIP (when a CLIP checkpoint is there); the best --keep are kept. Writes OUT/grid.png (one row per
caption, best first) and OUT/<caption number>_<rank>.png for every kept image, and prints their paths.

DALL-E 2 (--pipeline dalle2, unCLIP): caption -> CLIP text embedding -> prior -> image embedding z_i -> decoder
(--steps DDIM steps, --eta, --guidance) -> upsampler (when there is one) -> OUT/grid.png, one row per caption.
The modes of unCLIP §3, each writing a strip PNG to OUT:
  --variations IMAGE        variations.png: the image, then --num decodings of its z_i from fresh noise; second
                            row: from its DDIM-inverted latent x_T, η = 0 (≈ the image) then η > 0 (§3.1)
  --interpolate A B         interpolation.png: slerp from A's z_i to B's, --frames steps, one x_T for all (§3.2)
  --text-diff FROM TO --image IMAGE   text_diff.png: slerp of the image's z_i towards the normalised difference
                            of the captions' text embeddings, θ from 0 to 0.5, from its inverted x_T (§3.3)
  --no-prior                the decoder from the caption alone, z_i dropped (GLIDE-style)
Checkpoints are found by stage name: --dvae, --clip, --dalle, --prior, --decoder, --upsampler default to
out/<stage>/ckpt.pt.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from nanodalle import UserError, data, train_utils
from nanodalle.pipeline import (DALLE1, DALLE2, add_dalle1_sampling_args, check_dalle1_sampling, clip_image_embedding,
                                clip_text_inputs, slerp)

VARIATION_ETA = 0.8  # η of the variations from an inverted latent, when --eta is 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="dalle1", choices=["dalle1", "dalle2"], help="(default: dalle1)")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeat the flag for several)")
    p.add_argument("--prompts-file", help="a text file with one caption per line")
    p.add_argument("--num", type=int, default=8, help="candidates sampled per caption (default: 8)")
    p.add_argument("--keep", type=int, help="images kept per caption, best first (default: all of --num)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    add_dalle1_sampling_args(p)
    p.add_argument("--image", help="complete this image: keep its top --prompt-rows rows of codes (§3.3)")
    p.add_argument("--prompt-rows", type=int, default=None, help="rows of codes kept from --image (default: half)")
    p.add_argument("--dvae", default="out/dvae/ckpt.pt")
    p.add_argument("--clip", default="out/clip/ckpt.pt", help="for reranking; 'none' to skip (default: %(default)s)")
    p.add_argument("--dalle", default="out/dalle/ckpt.pt", help="the DALL-E 1 transformer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once (default: 64)")
    d = p.add_argument_group("dalle2")
    d.add_argument("--prior", default="out/prior/ckpt.pt", help="(default: %(default)s)")
    d.add_argument("--decoder", default="out/decoder/ckpt.pt", help="(default: %(default)s)")
    d.add_argument("--upsampler", default="out/upsampler/ckpt.pt",
                   help="'none' for the decoder's size (default: %(default)s, skipped if missing)")
    d.add_argument("--steps", type=int, help="DDIM steps of the decoder (default: its config's, toy 50)")
    d.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 DDPM-like (default: 0)")
    d.add_argument("--guidance", type=float, help="decoder guidance scale, 1 = off (default: its config's)")
    d.add_argument("--ddpm", action="store_true", help="ancestral DDPM over all 1000 steps instead of DDIM")
    d.add_argument("--no-prior", action="store_true", help="decode from the caption alone (GLIDE-style)")
    d.add_argument("--variations", metavar="IMAGE", help="variations of an image (§3.1)")
    d.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="interpolate between two images (§3.2)")
    d.add_argument("--text-diff", nargs=2, metavar=("FROM", "TO"), help="edit --image by a caption change (§3.3)")
    d.add_argument("--frames", type=int, default=6, help="frames of --interpolate / --text-diff (default: 6)")
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
    check_dalle1_sampling(args)


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
                                   **check_dalle1_sampling(args))
    return images[:, :args.keep], scores[:, :args.keep], pipe.clip is not None


def optional_checkpoint(path: str, default: str, flag: str, what: str):
    """A checkpoint that may be absent: 'none' skips it; a missing default is skipped with a note."""
    if path == "none":
        return None
    if not os.path.exists(path):
        if path != default:
            raise UserError(f"{flag} {path}: no such checkpoint (or {flag} none {what})")
        print(f"no {flag[2:]} at {path}: {what}")
        return None
    return path


def read_image(path: str, size: int) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        return data.to_tensor(data.load_image(path), size)  # (3, size, size) in [-1, 1]
    except data.BadSample:
        raise UserError(f"{path}: not a readable image")


def dalle2_pipeline(args, device) -> DALLE2:
    needs_prior = not (args.no_prior or args.variations or args.interpolate or args.text_diff)
    prior = args.prior if needs_prior else None
    upsampler = optional_checkpoint(args.upsampler, "out/upsampler/ckpt.pt", "--upsampler",
                                    "to keep the decoder's size")
    return DALLE2.from_checkpoints(args.clip, args.decoder, prior, upsampler, device)


def sample_dalle2(args, device):
    """The dalle2 modes. Returns (images (rows, cols, 3, H, W), file name, one line saying what the rows are)."""
    modes = [m for m in ("variations", "interpolate", "text_diff") if getattr(args, m)]
    if len(modes) > 1:
        raise UserError(f"--{modes[0].replace('_', '-')} and --{modes[1].replace('_', '-')}: choose one mode")
    if args.steps is not None and not 2 <= args.steps <= 1000:
        raise UserError(f"--steps {args.steps}: DDIM takes between 2 and 1000 steps (the training timesteps)")
    if args.frames < 2:
        raise UserError(f"--frames {args.frames}: at least 2")
    if args.text_diff and not args.image:
        raise UserError("--text-diff FROM TO edits an image: give it with --image IMAGE")
    for path in ([args.variations] if args.variations else []) + (args.interpolate or []) + (
            [args.image] if args.text_diff else []):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such image file")
    pipe = dalle2_pipeline(args, device)
    size = pipe.decoder.cfg.image_size
    gen = torch.Generator(pipe.device).manual_seed(args.seed)
    opts = dict(steps=args.steps, guidance_scale=args.guidance, generator=gen)

    final = pipe.upsampler.cfg.image_size if pipe.upsampler is not None else size

    def finish(images):  # decoded (N, 3, h, w) -> upsampled when there is an upsampler
        return pipe.upsample(images, generator=gen).float().cpu()

    def shown(path):  # a given image as it is, at the output size
        return read_image(path, final)[None]

    if args.variations:
        image = read_image(args.variations, size)[None].to(pipe.device)  # (1, 3, H, W)
        z = clip_image_embedding(pipe.clip, image).expand(args.num, -1)  # (num, D)
        fresh = pipe.decode(z, eta=args.eta, **opts)  # new noise: what z_i keeps and what it lets vary
        x_T = pipe.invert(image, z[:1], steps=args.steps).expand(args.num, -1, -1, -1)
        eta = args.eta if args.eta > 0 else VARIATION_ETA
        recon = pipe.decode(z[:1], noise=x_T[:1], eta=0.0, **opts)  # η = 0 from the inverted x_T: ≈ the image
        inverted = pipe.decode(z, noise=x_T, eta=eta, **opts)
        rows = [torch.cat([shown(args.variations), finish(fresh)]), finish(torch.cat([recon, inverted]))]
        return (torch.stack(rows), "variations.png",
                f"row 1: the image, then decodings of its CLIP embedding from fresh noise; row 2: from its DDIM-"
                f"inverted latent at η = 0, then at η = {eta}")
    fracs = torch.linspace(0, 1, args.frames).tolist()
    if args.interpolate:
        images = torch.stack([read_image(p, size) for p in args.interpolate]).to(pipe.device)  # (2, 3, H, W)
        z = clip_image_embedding(pipe.clip, images)  # (2, D)
        path = torch.cat([slerp(z[:1], z[1:], f) for f in fracs])  # (frames, D)
        noise = torch.randn(1, 3, size, size, generator=gen, device=pipe.device).expand(args.frames, -1, -1, -1)
        frames = pipe.decode(path, noise=noise, eta=0.0, **opts)  # one x_T for every frame
        row = torch.cat([shown(args.interpolate[0]), finish(frames), shown(args.interpolate[1])])
        return row[None], "interpolation.png", "the first image, the slerp path of CLIP embeddings, the second"
    if args.text_diff:
        image = read_image(args.image, size)[None].to(pipe.device)
        z_i = clip_image_embedding(pipe.clip, image)  # (1, D)
        z_t = clip_text_inputs(pipe.clip, list(args.text_diff))[0]  # (2, D) the two captions' embeddings
        z_d = F.normalize(z_t[1:] - z_t[:1], dim=-1)  # (1, D) the text diff (§3.3)
        path = torch.cat([F.normalize(slerp(z_i, z_d, 0.5 * f), dim=-1) for f in fracs])  # θ in [0, 0.5]
        x_T = pipe.invert(image, z_i, steps=args.steps).expand(args.frames, -1, -1, -1)
        frames = pipe.decode(path, noise=x_T, eta=0.0, **opts)
        return (torch.cat([shown(args.image), finish(frames)])[None], "text_diff.png",
                f"the image, then its embedding moved from {args.text_diff[0]!r} towards {args.text_diff[1]!r}")
    prompts = read_prompts(args)
    text_len = pipe.decoder.cfg.text_len
    for p in prompts:
        n = len(pipe.tokenizer.encode(p))
        if n > text_len - 1:
            print(f"warning: {p!r} is {n} tokens; the decoder reads {text_len - 1}: the rest is cut")
    images = pipe.generate(prompts, num=args.num, seed=args.seed, use_prior=not args.no_prior, steps=args.steps,
                           eta=args.eta, guidance_scale=args.guidance, sampler="ddpm" if args.ddpm else "ddim",
                           progress=True)
    return images.cpu(), "grid.png", f"one row per caption ({'no prior' if args.no_prior else 'prior'})"


def save_rows(images: torch.Tensor, out: str, name: str) -> str:
    """(rows, cols, 3, H, W) -> OUT/name as one grid, and each image as OUT/<row>_<col>.png."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    train_utils.save_grid(images.flatten(0, 1), path, nrow=images.size(1))
    for r in range(images.size(0)):
        for c in range(images.size(1)):
            train_utils.save_grid(images[r, c:c + 1], os.path.join(out, f"{r:03d}_{c}.png"), nrow=1, pad=0)
    return path


def main():
    args = parse_args()
    device = train_utils.pick_device(args.device)
    if args.pipeline == "dalle2":
        if args.num < 1:
            raise UserError(f"--num {args.num}: sample at least 1 image per caption")
        images, name, what = sample_dalle2(args, device)
        print(f"{what}: {save_rows(images, args.out, name)}")
        return
    prompts = read_prompts(args)
    check_sampling_flags(args)
    if args.image and not os.path.isfile(args.image):
        raise UserError(f"--image {args.image}: no such file")
    images, scores, ranked = sample_dalle1(args, prompts, device)  # (P, keep, 3, H, W), (P, keep)
    grid = save_rows(images, args.out, "grid.png")
    for p, prompt in enumerate(prompts):
        score = f" (CLIP score of the best: {scores[p, 0]:.3f})" if ranked else ""
        print(f"{prompt!r}: {args.out}/{p:03d}_*.png{score}")
    print(f"grid ({len(prompts)} rows, {'best first' if ranked else 'not reranked'}): {grid}")


if __name__ == "__main__":
    train_utils.main(main)
