"""Train CLIP (nanodalle/clip.py): the shared image-text embedding of DALL-E 1 (reranking) and unCLIP.

    python train_clip.py                      # toy preset on the built-in shapes, ~8 minutes on a 2-core CPU
    python train_clip.py --data my_images/ --size small
    torchrun --nproc_per_node 8 train_clip.py --size full --data shards/
    python train_clip.py --size full --dry-run

Writes OUT/ckpt.pt (with the tokenizer's state under "tokenizer"), OUT/log.jsonl and OUT/metrics.json:
  t2i_top1_100, i2t_top1_100   held-out retrieval: the first 1000 "val" pairs in chunks of 100; a caption is
                               right when its own image scores highest of the 100 (and the other way round)
  zeroshot_color/shape/position  (--data shapes only) zero-shot accuracy on the single-object val images

The contrastive batch. Each caption's negatives are the other images of its batch, so the batch size is part
of the objective (CLIP used 32,768). With DDP every rank all-gathers the features of all ranks and computes
the loss over the global batch (world size × --batch-size pairs): see gather_features. Gradient
accumulation does NOT enlarge the contrastive batch: each micro-batch's negatives are only its own. On the
built-in shapes each image also has a hard-negative caption, one edit from its own (shapes.hard_negative), among
the captions it must choose from (NegCLIP); --no-hard-negatives turns them off.
"""
import random

import torch
import torch.distributed as dist

from nanodalle import checkpoint, data, flags, shapes, train_utils
from nanodalle.clip import CLIP, CLIPConfig, PRESETS
from nanodalle.evaluate import evaluate_clip

# Training settings per preset. Paper (§2.5 and its hyperparameter tables): AdamW β (0.9, 0.98), ε 1e-6,
# decoupled weight decay 0.2, 2000 warm-up steps then a cosine, batch 32,768, 32 epochs of 400M pairs.
# The toy preset trades those for speed on a 2-core CPU: many small steps beat few large ones there.
TRAIN = {
    "toy": dict(steps=2400, batch_size=256, lr=2e-3, warmup=100, min_lr_frac=0.05, weight_decay=0.1),
    "small": dict(steps=100_000, batch_size=512, lr=5e-4, warmup=2000, min_lr_frac=0.0, weight_decay=0.2),
    "full": dict(steps=400_000, batch_size=128, lr=4e-4, warmup=2000, min_lr_frac=0.0, weight_decay=0.2),  # ×256 GPUs
    "unclip": dict(steps=400_000, batch_size=128, lr=4e-4, warmup=2000, min_lr_frac=0.0, weight_decay=0.2),
}
BETAS, EPS = (0.9, 0.98), 1e-6  # CLIP's hyperparameter tables for ViTs: β2 0.98, ε 1e-6
EVAL_PAIRS = 1000


class _ScaleGrad(torch.autograd.Function):
    """y = x in the forward; the gradient times `scale` in the backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gather_features(*features):
    """All-gather (B, D) features (images, captions, hard negatives) from the W DDP ranks into (W·B, D), in rank
    order: the global batch.

    dist.all_gather returns copies without gradient, so the local slice is replaced by the local tensors
    (open_clip's trick): every rank computes the same global loss L and back-propagates into its own
    features only. DDP then *averages* the W ranks' gradients, which would give 1/W of dL/dθ (the sum of the
    W local parts); scaling the local slice's gradient by W makes the average exactly dL/dθ, the gradient of
    one process holding the whole batch. (logit_scale is the same on every rank and needs no scaling.)
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for x in features:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())  # every rank's (B, D), no gradient
        parts[rank] = _ScaleGrad.apply(x, world)
        gathered.append(torch.cat(parts))  # (W·B, D)
    return gathered


def main():
    parser = flags.make_parser("clip", __doc__.split("\n")[0], CLIPConfig, PRESETS, TRAIN)
    parser.add_argument("--tokenizer", help="a .tiktoken file or tiktoken encoding name (default: the shipped "
                                            "vocabulary; on --resume the checkpoint's)")
    parser.add_argument("--text-len", type=int, help="tokens per caption, eot included (default: context_length)")
    parser.add_argument("--no-hard-negatives", action="store_true",
                        help="built-in shapes: train without a one-edit negative caption per pair (shapes.hard_negative)")
    args = parser.parse_args()
    cfg = flags.config_from_args(CLIPConfig, PRESETS, args)
    if args.dry_run:
        return train_utils.dry_run(CLIP, cfg, args, "clip")
    for what, width, heads in (("vision", cfg.vision_width, cfg.vision_heads), ("text", cfg.text_width, cfg.text_heads)):
        if width % heads:
            raise train_utils.UserError(f"--{what}-width {width} is not a multiple of --{what}-heads {heads}")
    if cfg.image_size % cfg.patch_size:
        raise train_utils.UserError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")

    tokenizer = checkpoint.run_tokenizer(args, "clip")
    if (cfg.vocab_size, cfg.eot_id) != (tokenizer.vocab_size, tokenizer.eot_id):
        print(f"vocab_size {cfg.vocab_size} -> {tokenizer.vocab_size}, eot_id {cfg.eot_id} -> {tokenizer.eot_id}: "
              f"the preset's values, set to those of the tokenizer {tokenizer.name!r}")
        cfg.vocab_size, cfg.eot_id = tokenizer.vocab_size, tokenizer.eot_id
    text_len = args.text_len or cfg.context_length
    if not 2 <= text_len <= cfg.context_length:
        raise train_utils.UserError(f"--text-len {text_len}: must be between 2 and context_length {cfg.context_length}")

    def make_model(c):
        model = CLIP(c)
        model.tokenizer = tokenizer  # a plain attribute, not in the state dict: the checkpoint saves its state
        return model

    trainer = train_utils.Trainer(args, "clip", cfg, make_model, betas=BETAS, eps=EPS,
                                  extra_state={"tokenizer": tokenizer.state()})
    cfg, raw = trainer.cfg, trainer.raw_model  # on --resume, the checkpoint's config
    train_set = data.make_dataset(args.data, cfg.image_size, "train", rank=trainer.rank,
                                  world_size=trainer.world_size, seed=args.seed)
    val_set = data.make_dataset(args.data, cfg.image_size, "val")
    val_images, val_captions = data.first_pairs(val_set, EVAL_PAIRS)
    val_tokens = tokenizer.encode_batch(val_captions, text_len)
    loader = data.loader(train_set, args.batch_size, trainer.rank, trainer.world_size,
                         seed=args.seed + trainer.step, num_workers=args.num_workers,
                         pin_memory=trainer.device.type == "cuda")
    # Hard negatives (NegCLIP, Yuksekgonul et al. 2023 §5): on the built-in shapes each pair also brings a
    # caption one edit away (another shape, or the colours swapped) that its image must score below its own.
    negatives = args.data == "shapes" and not args.no_hard_negatives
    negative_rng = random.Random(f"negatives/{args.seed}/{trainer.rank}/{trainer.step}")

    def make_batch(images, captions):
        tokens = tokenizer.encode_batch(captions, text_len)  # (B, T)
        if not negatives:
            return images, tokens, None
        negative_captions = [shapes.hard_negative(c, negative_rng) for c in captions]
        return images, tokens, tokenizer.encode_batch(negative_captions, text_len)  # (B, T) each
    batches = (make_batch(images, captions) for images, captions in loader)

    def loss_fn(model, batch, step):
        images, tokens, negative_tokens = batch  # (B, 3, H, W), (B, T), (B, T) or None
        loss = model(images, tokens, gather=gather_features if trainer.distributed else None,
                     negative_tokens=negative_tokens)
        return loss, {"scale": raw.scale().detach()}  # 1/τ, the learned inverse temperature

    def evaluate(step):
        model = trainer.eval_model()  # in eval mode, without gradients (Trainer.run_evaluation)
        metrics = evaluate_clip(model, val_set, val_images, val_tokens, zero_shot=args.data == "shapes")
        metrics["scale"] = model.scale().item()
        skipped = data.skipped_summary(train_set)
        return {**metrics, **({"skipped": skipped} if skipped else {})}

    trainer.fit(batches, loss_fn, evaluate)


if __name__ == "__main__":
    train_utils.main(main)
