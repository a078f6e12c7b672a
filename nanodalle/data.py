"""Data: where (image, caption) pairs come from, and how an image becomes a tensor.

Every data set yields `(image, caption)`: a float32 tensor (3, size, size) in [-1, 1] and a str.
Three sources, picked by `make_dataset(spec, ...)` from the `--data` flag:

1. `shapes` -- the built-in procedural set (nanodalle/shapes.py): coloured shapes with exact captions,
   drawn on the fly, so the toy presets train on a laptop with nothing to download.

2. A folder of images with captions next to them (searched recursively, hidden files ignored):

       photos/cat.jpg     photos/cat.txt      <- one caption per line; each sample picks a random line
       photos/a/dog.PNG   photos/a/dog.txt    <- extensions: jpg jpeg png webp bmp gif, any case

3. Tar shards, the layout img2dataset and webdataset write (read with the standard library's tarfile):

       shards/00000.tar: 000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
       shards/00001.tar: ...

   Files sharing a key (the name up to the first dot) form one sample: an image (jpg/png/webp...) and a
   .txt caption; anything else (.json metadata...) is ignored. Give a directory, one .tar, a glob
   ("shards/*.tar") or a brace range ("shards/{00000..00009}.tar").

Train/validation split for 2 and 3: a sample is in "val" when md5(key) % 1000 < val_permille (default 10,
i.e. 1%), else in "train"; "all" takes everything. Hashing the key (not the position) keeps the split
fixed when files are added, removed or re-shuffled. Bad input (a missing or empty caption, a file that is
not a readable image) is skipped and counted in `ds.skipped`, with a warning naming the file.
"""
import collections
import functools
import glob
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import tarfile
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from . import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
SPLITS = ("train", "val", "all")
MAX_WARNINGS = 20  # per data set and process: enough to find the bad files, not enough to flood the log
log = logging.getLogger("nanodalle")


class BadSample(Exception):
    """One image could not be read. The data sets catch it, count it and move on."""


# -----------------------------------------------------------------------------
# images


def load_image(src):
    """Open a path or file object and return a fully decoded, upright, 8-bit RGB PIL image."""
    name = getattr(src, "name", src)
    try:
        with Image.open(src) as img:
            img.load()  # decode now: truncated or corrupt files fail here, not later inside a batch
            img = ImageOps.exif_transpose(img)  # phone photos are stored sideways plus an EXIF "rotate" tag
            return _to_rgb(img)
    except Exception as e:  # decoders raise many types on bad bytes (OSError, SyntaxError, ValueError...)
        raise BadSample(f"{name}: {e}") from e


def _to_rgb(img):
    """Convert any PIL mode to RGB 8-bit: scale (not clip) 16-bit and float, put transparency on white."""
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grayscale (PNG/TIFF): 65535 -> 255
        a = np.array(img, dtype=np.float64) / 257.0
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    elif img.mode == "F":  # float has no fixed range: take [0, 1] as is, else stretch min..max
        a = np.array(img, dtype=np.float64)
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), max(a.max(), a.min() + 1e-12))
        img = Image.fromarray(((a - lo) / (hi - lo) * 255).round().clip(0, 255).astype(np.uint8))
    if "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")  # P/L/RGB with a transparent colour key become RGBA here
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)  # transparent pixels show white, not black
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr... (a no-op copy for RGB)


def to_tensor(img, size, random_crop=False, rng=None):
    """Resize the shorter side to `size` and crop size x size (centre, or random for training).

    Returns float32 (3, size, size) in [-1, 1]. We crop the largest square first and resize it once:
    the same picture as resize-then-crop, without resizing pixels that would be thrown away.
    """
    w, h = img.size
    s = min(w, h)
    if random_crop:
        rng = rng or random
        left, top = rng.randint(0, w - s), rng.randint(0, h - s)
    else:
        left, top = (w - s) // 2, (h - s) // 2
    # bicubic; PIL widens the filter when shrinking, which is the antialiasing
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


def to_pil(images):
    """Inverse of to_tensor for (B, 3, H, W) or (3, H, W) in [-1, 1]; returns a list of PIL images."""
    if images.dim() == 3:
        images = images[None]
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]  # (H, W, 3) each


# -----------------------------------------------------------------------------
# data sets


def in_split(key, split, val_permille):
    """Deterministic split by a hash of the key; md5, because Python's hash() changes every run."""
    if split == "all":
        return True
    is_val = int(hashlib.md5(key.encode()).hexdigest(), 16) % 1000 < val_permille
    return is_val == (split == "val")


def _check_split(split):
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def _caption_lines(data):
    """Non-empty lines of a caption file (bytes); utf-8-sig drops a BOM, bad bytes don't crash."""
    return [l.strip() for l in data.decode("utf-8-sig", errors="replace").splitlines() if l.strip()]


class SkipCounter:
    """Counts skipped samples by reason and warns once per bad file (at most MAX_WARNINGS times).

    With DataLoader workers each worker process has its own copy of these counters, which the main
    process never sees: the warnings (which name the file) are what reaches the log from there.
    """

    def _init_skips(self):
        self.skipped = collections.Counter()  # reason -> count
        self._bad = set()  # names already counted, so an epoch that meets them again doesn't recount

    def _skip(self, reason, name, detail=""):
        if name in self._bad:
            return
        self._bad.add(name)
        self.skipped[reason] += 1
        n = sum(self.skipped.values())
        if n <= MAX_WARNINGS:
            log.warning(f"skipping {name}: {reason}{': ' + str(detail) if detail else ''}")
        if n == MAX_WARNINGS:
            log.warning(f"{MAX_WARNINGS} bad samples: further ones are skipped without a warning; see summary()")

    def pick_caption(self, lines, rng):
        """One random caption line (training), or all of them joined by newlines when the data set's
        `all_captions` is set: train_transformer.py caches every line of an image with its codes."""
        return "\n".join(lines) if getattr(self, "all_captions", False) else rng.choice(lines)

    def _skip_text(self):
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"


class FolderDataset(Dataset, SkipCounter):
    """Images with same-stem .txt captions under `root`, found recursively. Map-style: has a length."""

    def __init__(self, root, size, split="train", random_crop=False, val_permille=10, seed=0):
        _check_split(split)
        if not os.path.isdir(root):
            raise UserError(f"data path {root} is not a folder: give a folder of images with .txt captions")
        self.root, self.size, self.split, self.random_crop = root, size, split, random_crop
        self.rng = random.Random(seed)  # loader() gives each worker its own; see _seed_worker
        self._init_skips()
        self.paths, self.captions = [], []  # image path, its caption lines
        for path, key in self._scan(root):
            if not in_split(key, split, val_permille):
                continue
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.isfile(txt):  # caption problems are found now; bad images when loaded
                self._skip("missing caption", path)
                continue
            with open(txt, "rb") as f:
                lines = _caption_lines(f.read())
            if not lines:
                self._skip("empty caption", path)
                continue
            self.paths.append(path)
            self.captions.append(lines)
        if not self.paths:
            what = "" if split == "all" else f" in split {split!r} (val_permille={val_permille})"
            raise UserError(f"no images with captions found under {root}{what}: expected image files "
                            f"with same-stem .txt captions, or .tar shards")
        (log.warning if self.skipped else log.info)(self.summary())

    @staticmethod
    def _scan(root):
        """Yield (image path, key) in sorted order; the key is the relative path without extension."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: same order on every OS
            for name in sorted(filenames):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                    path = os.path.join(dirpath, name)
                    key = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
                    yield path, key

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        # A bad image is replaced by the next good one; trying each index at most once means a folder
        # of nothing but broken files ends in an error instead of an endless loop.
        for j in range(i, i + len(self)):
            j %= len(self)
            if self.paths[j] in self._bad:
                continue
            try:
                img = load_image(self.paths[j])
            except BadSample as e:
                self._skip("unreadable image", self.paths[j], e.__cause__)
                continue
            return to_tensor(img, self.size, self.random_crop, self.rng), self.pick_caption(self.captions[j], self.rng)
        raise UserError(f"no readable image under {self.root}: every image file failed to load")

    def summary(self):
        return f"{self.root}: {len(self)} samples in split {self.split!r}; skipped: {self._skip_text()}"


class TarDataset(IterableDataset, SkipCounter):
    """(image, caption) pairs streamed from webdataset-style .tar shards.

    Work is split across DDP ranks and DataLoader workers ("slots", rank-major): slot k of n reads
    shards k, k+n, k+2n... If there are fewer shards than slots, every slot reads every shard and
    keeps samples number k, k+n, k+2n... instead, so no sample is read twice in a pass (each slot
    then reads n times the bytes: write at least world_size x num_workers shards to avoid that).
    Slots may get different amounts of data; with loop=True (training) that does not matter.
    """

    def __init__(self, shards, size, split="train", random_crop=False, shuffle_buffer=1000, seed=0,
                 rank=0, world_size=1, loop=True, val_permille=10):
        _check_split(split)
        if not shards:
            raise UserError("no .tar shards given: expected a folder, a .tar file, a glob or a brace range")
        self.shards, self.size, self.split, self.random_crop = list(shards), size, split, random_crop
        self.shuffle_buffer, self.seed, self.loop, self.val_permille = shuffle_buffer, seed, loop, val_permille
        self.rank, self.world_size = rank, world_size
        self.passes = 0  # how many times __iter__ was called in this process: varies the shuffle
        self._init_skips()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()  # None in the main process
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, n_slots = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}/{slot}/{self.passes}")  # a str seed is hashed the same every run
        self.passes += 1
        while True:
            n = 0
            for sample in self._one_pass(slot, n_slots, rng):
                n += 1
                yield sample
            if not self.loop or n == 0:  # n == 0: nothing valid for this slot; stop rather than spin
                return

    def _one_pass(self, slot, n_slots, rng):
        if len(self.shards) >= n_slots:
            shards, modulo = self.shards[slot::n_slots], False
            if self.shuffle_buffer > 0:
                shards = rng.sample(shards, len(shards))
        else:
            shards, modulo = self.shards, True  # everyone reads all shards in the same order
        raw = self.raw_samples(shards, slot if modulo else None, n_slots)
        for name, data, lines in self._shuffled(raw, rng):
            try:  # decode after the shuffle buffer: it holds compressed bytes, not big float tensors
                img = load_image(io.BytesIO(data))
            except BadSample as e:
                self._skip("unreadable image", name, e.__cause__)
                continue
            yield to_tensor(img, self.size, self.random_crop, rng), self.pick_caption(lines, rng)

    def _shuffled(self, samples, rng):
        """A shuffle buffer: keep up to shuffle_buffer samples and emit a random one as each arrives."""
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) > self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def raw_samples(self, shards, slot=None, n_slots=1):
        """Yield (name, image bytes, caption lines) of the valid samples in this split.

        With a slot, keep only samples whose running index % n_slots == slot.
        """
        i = -1
        for shard in shards:
            for key, files in self._read_tar(shard):
                i += 1
                if slot is not None and i % n_slots != slot:
                    continue
                if not in_split(key, self.split, self.val_permille):
                    continue
                name = f"{shard}:{key}"
                image_ext = next((e for e in files if "." + e in IMAGE_EXTS), None)
                if image_ext is None:
                    self._skip("missing image", name)
                elif files.get("txt") is None:
                    self._skip("missing caption", name)
                elif not (lines := _caption_lines(files["txt"])):
                    self._skip("empty caption", name)
                else:
                    yield name, files[image_ext], lines

    def _read_tar(self, path):
        """Yield (key, {ext: bytes}) per sample; members of one sample are consecutive in the tar."""
        try:
            with tarfile.open(path, "r|*") as tf:  # streaming mode: one sequential read, also for .tar.gz
                key, files = None, {}
                for m in tf:
                    base = posixpath.basename(m.name)
                    if not m.isfile() or base.find(".") <= 0:  # dirs, no extension, hidden "._x.jpg"
                        continue
                    k = posixpath.join(posixpath.dirname(m.name), base[: base.find(".")])
                    ext = base[base.find(".") + 1:].lower()
                    if k != key:
                        if key is not None:
                            yield key, files
                        key, files = k, {}
                    wanted = ext == "txt" or "." + ext in IMAGE_EXTS
                    files[ext] = tf.extractfile(m).read() if wanted else None  # .json etc.: skip the bytes
                if key is not None:
                    yield key, files
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # truncated or not a tar
            self._skip("unreadable shard", path, e)

    def summary(self):
        return f"{len(self.shards)} shards, split {self.split!r}; skipped: {self._skip_text()}"


# -----------------------------------------------------------------------------
# choosing a data set from --data, and batching it


def find_shards(spec):
    """Shard paths from a directory (its *.tar, sorted), one .tar, a glob, or "{00000..00009}" ranges."""
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    elif m := re.search(r"\{(\d+)\.\.(\d+)\}", spec):  # brace range: zero-padded like the first number
        a, b = m.group(1), m.group(2)
        shards = [s for n in range(int(a), int(b) + 1)
                  for s in find_shards(spec[: m.start()] + str(n).zfill(len(a)) + spec[m.end():])]
    elif glob.has_magic(spec):
        shards = sorted(glob.glob(spec))
    else:
        shards = [spec] if os.path.isfile(spec) else []
    if not shards:
        raise UserError(f"no .tar shards found at {spec}: give a folder of .tar files, a .tar file, "
                        f"a glob like 'data/*.tar' or a range like 'data/{{00000..00009}}.tar'")
    return shards


def _is_tar_spec(spec):
    if os.path.isdir(spec):
        return bool(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
    return spec.endswith(".tar") or glob.has_magic(spec) or re.search(r"\{\d+\.\.\d+\}", spec) is not None


def make_dataset(spec, size, split="train", random_crop=False, rank=0, world_size=1, seed=0):
    """The data set for a --data value: "shapes", a folder of .tar shards / a shard spec, or an image folder."""
    if spec == "shapes":
        from . import shapes  # imported here so the rest of this file works without it

        if split not in shapes.SPLITS:  # shapes has its own splits: train, val, heldout
            raise UserError(f"unknown split {split!r} for shapes: use one of {', '.join(shapes.SPLITS)}")
        return shapes.ShapesDataset(split=split, size=size)
    _check_split(split)
    if _is_tar_spec(spec):
        return TarDataset(find_shards(spec), size, split, random_crop, seed=seed, rank=rank,
                          world_size=world_size, shuffle_buffer=1000 if split == "train" else 0)
    if os.path.isdir(spec):
        return FolderDataset(spec, size, split, random_crop, seed=seed)
    raise UserError(f"data path {spec} not found: give 'shapes', a folder of images with same-stem .txt "
                    f"captions, or .tar shards")


def iter_captions(spec):
    """Every caption line of a folder or tar data set (all splits), e.g. to train a tokenizer."""
    if _is_tar_spec(spec):
        ds = TarDataset(find_shards(spec), size=1, split="all")
        for _, _, lines in ds.raw_samples(ds.shards):
            yield from lines
    elif os.path.isdir(spec):
        for lines in FolderDataset(spec, size=1, split="all").captions:
            yield from lines
    else:
        raise UserError(f"data path {spec} not found: give a folder of images with captions or .tar shards")


def collate(batch):
    """[(image, caption)] -> (images (B, 3, H, W), [caption, ...])."""
    return torch.stack([image for image, _ in batch]), [caption for _, caption in batch]


def _seed_worker(seed, rank, worker_id, dataset=None):
    # Each worker process starts with a copy of the data set's RNG; without this every worker
    # would pick the same crops and caption lines. (Tar sets seed themselves per rank and worker.)
    ds = dataset or torch.utils.data.get_worker_info().dataset
    if isinstance(ds, FolderDataset):
        ds.rng = random.Random(f"{seed}/{rank}/{worker_id}")


def loader(dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0, drop_last=True,
           pin_memory=False):
    """An endless iterator of batches (images (B, 3, H, W), [captions]) for this rank.

    Map-style sets (folder, shapes) are split across ranks by DistributedSampler and reshuffled every
    epoch, deterministically from `seed`; iterable sets (tar) split themselves across ranks and workers.
    """
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        if drop_last and len(sampler) < batch_size:
            raise UserError(f"the data set has {len(dataset)} samples, fewer than batch size {batch_size} "
                            f"x {world_size} ranks: lower --batch-size or add data")
    if num_workers == 0:
        _seed_worker(seed, rank, 0, dataset)  # the main process does the loading: seed it the same way
    dl = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                    collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                    persistent_workers=num_workers > 0,  # keep workers (and their RNG state) across epochs
                    worker_init_fn=functools.partial(_seed_worker, seed, rank),
                    generator=torch.Generator().manual_seed(seed * 1000 + rank))  # workers' torch seeds
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)  # a new order every epoch, the same on every rank
        n = 0
        for batch in dl:
            n += 1
            yield batch
        if n == 0:  # otherwise an empty iterable set would make this loop spin forever
            raise UserError(f"the data set gave no batch of {batch_size} samples: add data or lower --batch-size")
        epoch += 1


@torch.no_grad()
def cached_split(spec, size, split, max_images, path, tag: dict, encode, what: str, batch_size=256, num_workers=0):
    """Run a frozen model over a split of the data once and keep what it returns in a cache file.

    The stages after the dVAE and CLIP train on their outputs (codes, embeddings), which never change while
    the upstream model is frozen: computing them once, not every epoch, is most of the speed of those stages.
    `encode(images (b, 3, H, W), lines (b lists of caption lines), first (index of the first image))` returns
    a dict of tensors for the batch; they are concatenated. The cache at `path` is reused when its `tag`
    (the model's fingerprint, the data...) equals this one, else made again. Returns
    {"tag", "captions" (per image, its caption lines), and the encoded tensors}.
    """
    if os.path.exists(path):
        cache = torch.load(path, weights_only=True)
        if cache["tag"] == tag:
            print(f"{what}: {len(cache['captions'])} {split} images from {path}")
            return cache
        print(f"{what}: {path} was made with another model or data set, encoding again")
    dataset = make_dataset(spec, size, split)
    dataset.all_captions = True  # keep every caption line of an image, joined by newlines
    if isinstance(dataset, IterableDataset):
        dataset.loop, dataset.shuffle_buffer = False, 0  # one pass, in order
    else:
        n = len(dataset) if max_images is None else min(len(dataset), max_images)
        dataset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    parts, captions = collections.defaultdict(list), []
    total = None if isinstance(dataset, IterableDataset) else len(dataset)
    with tqdm(total=total, desc=f"{what}: encoding {split} images", leave=False) as bar:
        for images, texts in loader:
            room = len(texts) if max_images is None else max_images - len(captions)
            lines = [t.split("\n") for t in texts[:room]]
            for key, value in encode(images[:room], lines, len(captions)).items():
                parts[key].append(value.cpu())
            captions += lines
            bar.update(len(lines))
            if max_images is not None and len(captions) >= max_images:
                break
    if not captions:
        raise UserError(f"no {split} images in {spec}: add data")
    cache = {"tag": tag, "captions": captions, **{k: torch.cat(v) for k, v in parts.items()}}
    tmp = f"{path}.tmp{os.getpid()}"  # written atomically, like the checkpoints
    torch.save(cache, tmp)
    os.replace(tmp, path)
    print(f"{what}: encoded {len(captions)} {split} images -> {path}")
    return cache


def first_pairs(dataset, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n (image, caption) pairs of a data set: (n, 3, H, W) images and n captions, a fixed
    evaluation batch. Tar shards are read in one pass, so a small validation split is not repeated."""
    if isinstance(dataset, IterableDataset):
        dataset.loop = False
        samples = iter(dataset)
    else:
        samples = (dataset[i] for i in range(min(n, len(dataset))))
    pairs = [s for _, s in zip(range(n), samples)]
    if not pairs:
        raise UserError("the validation split is empty: add data (about 1% of samples go to validation)")
    return torch.stack([image for image, _ in pairs]), [caption for _, caption in pairs]


def first_images(dataset, n: int) -> torch.Tensor:
    """The first n images of a data set (first_pairs without the captions)."""
    return first_pairs(dataset, n)[0]


def skipped_summary(dataset) -> str:
    """'3 unreadable image, 1 empty caption' for user data sets that skipped samples, else ''."""
    skipped = getattr(dataset, "skipped", None)
    return dataset._skip_text() if skipped else ""
