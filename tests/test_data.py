"""Tests for nanodalle/data.py: image conversion, the folder and tar data sets, splits, the loader.

All data is made on the fly in tmp_path with PIL; the whole file runs in a few seconds on a CPU.
"""
import io
import itertools
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nanodalle import UserError
from nanodalle import data


def png_bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w=24, h=20, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rgb_at(img, xy=(0, 0)):
    return img.getpixel(xy)


# -----------------------------------------------------------------------------
# images


def test_modes_convert_to_rgb():
    def load(img, fmt="PNG", **kw):
        out = data.load_image(io.BytesIO(png_bytes(img, fmt, **kw)))
        assert out.mode == "RGB"
        return rgb_at(out)

    assert load(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    assert load(Image.new("RGBA", (4, 4), (255, 0, 0, 0))) == (255, 255, 255)  # transparent -> white
    assert load(Image.new("RGBA", (4, 4), (0, 0, 0, 255))) == (0, 0, 0)  # opaque stays
    assert load(Image.new("LA", (4, 4), (10, 0))) == (255, 255, 255)
    r, g, b = load(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))  # half transparent black on white ~ grey
    assert abs(r - 127) <= 1 and r == g == b
    # palette with a transparent index: index 0 transparent -> white, index 1 blue
    p = Image.new("P", (2, 1), 0)
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((1, 0), 1)
    out = data.load_image(io.BytesIO(png_bytes(p, transparency=0)))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)
    assert load(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG") == (255, 0, 0)  # CMYK red
    # 16-bit must be scaled: 65535 -> 255, 257 * 100 -> 100 (clipping would give 255 for both)
    a = np.array([[65535, 25700]], dtype=np.uint16)
    out = data.load_image(io.BytesIO(png_bytes(Image.fromarray(a))))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (100, 100, 100)
    assert load(Image.new("I", (4, 4), 25700), "TIFF") == (100, 100, 100)  # 32-bit int holding 16-bit data
    assert load(Image.new("F", (4, 4), 1.0), "TIFF") == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (32, 16), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 16))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": left column becomes the top row
    out = data.load_image(io.BytesIO(png_bytes(img, "JPEG", exif=exif, quality=95)))
    assert out.size == (16, 32)
    top, bottom = rgb_at(out, (8, 4)), rgb_at(out, (8, 28))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_to_tensor_resize_centre_crop_and_back():
    img = Image.new("RGB", (64, 32), (0, 255, 0))  # green centre square, red and blue sides
    img.paste((255, 0, 0), (0, 0, 16, 32))
    img.paste((0, 0, 255), (48, 0, 64, 32))
    x = data.to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # the centre square is green; the outermost columns may pick up a little red/blue from the
    # bicubic filter reaching across the crop edge (as resize-then-crop would)
    assert torch.allclose(x[1, :, 1:-1], torch.ones(16, 14)) and torch.allclose(x[0, :, 1:-1], -torch.ones(16, 14))
    assert x[1].min() > 0.5
    y = data.to_tensor(img, 16, random_crop=True, rng=random.Random(0))
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1
    # to_pil inverts to_tensor exactly at the same size, for one image and for a batch
    small = noise(8, 8)
    back = data.to_pil(data.to_tensor(small, 8))[0]
    assert np.array_equal(np.array(back), np.array(small))
    assert len(data.to_pil(torch.zeros(3, 3, 8, 8))) == 3


def test_load_image_bad_input():
    with pytest.raises(data.BadSample):
        data.load_image(io.BytesIO(os.urandom(100)))
    jpeg = png_bytes(noise(64, 64), "JPEG")
    with pytest.raises(data.BadSample):
        data.load_image(io.BytesIO(jpeg[: len(jpeg) // 2]))


# -----------------------------------------------------------------------------
# folder data set


def write_folder(root):
    """3 good samples in nested dirs, 2 images that fail to load, 1 empty and 1 missing caption."""
    (root / "a" / "b").mkdir(parents=True)
    noise(seed=1).save(root / "one.jpg")
    (root / "one.txt").write_text("first line\nsecond line\n\nthird line\n")
    noise(seed=2).save(root / "a" / "two.PNG")
    (root / "a" / "two.txt").write_text("two\n")
    noise(seed=3).save(root / "a" / "b" / "three.webp")
    (root / "a" / "b" / "three.txt").write_text("three")
    (root / "corrupt.png").write_bytes(os.urandom(300))
    (root / "corrupt.txt").write_text("corrupt")
    jpeg = png_bytes(noise(64, 64, seed=4), "JPEG")
    (root / "a" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "a" / "trunc.txt").write_text("trunc")
    noise(seed=5).save(root / "empty.png")
    (root / "empty.txt").write_text("  \n\n")
    noise(seed=6).save(root / "nocap.bmp")
    (root / "notes.txt").write_text("a caption without an image is ignored")


def test_folder_dataset_skips_bad_files(tmp_path):
    write_folder(tmp_path)
    ds = data.FolderDataset(str(tmp_path), size=16, split="all")
    assert len(ds) == 5  # 3 good + 2 that only fail when loaded
    assert ds.skipped == {"missing caption": 1, "empty caption": 1}
    captions = []
    for images, caps in DataLoader(ds, batch_size=1, num_workers=0, collate_fn=data.collate):
        assert images.shape == (1, 3, 16, 16)
        captions += caps
    assert len(captions) == 5 and "corrupt" not in captions and "trunc" not in captions
    assert ds.skipped["unreadable image"] == 2
    assert "2 unreadable image" in ds.summary()


def test_folder_random_caption_line(tmp_path):
    write_folder(tmp_path)
    ds = data.FolderDataset(str(tmp_path), size=8, split="all")
    i = [p.endswith("one.jpg") for p in ds.paths].index(True)
    assert {ds[i][1] for _ in range(60)} == {"first line", "second line", "third line"}


def test_folder_all_bad_raises_instead_of_looping(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"not an image")
        (tmp_path / f"{k}.txt").write_text("x")
    ds = data.FolderDataset(str(tmp_path), size=8, split="all")
    with pytest.raises(UserError):
        ds[0]


def test_empty_or_missing_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        data.FolderDataset(str(tmp_path), size=8)
    with pytest.raises(UserError, match=str(tmp_path)):
        data.make_dataset(str(tmp_path), size=8)
    missing = str(tmp_path / "nope")
    for spec in (missing, missing + ".tar", missing + "/{0..3}.tar"):
        with pytest.raises(UserError, match="nope"):
            data.make_dataset(spec, size=8)
    with pytest.raises(UserError):
        data.make_dataset("shapes", size=8, split="test")


def test_split_disjoint_and_deterministic(tmp_path):
    for k in range(40):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text(str(k))
    def keys(split):
        return set(data.FolderDataset(str(tmp_path), 4, split=split, val_permille=300).paths)
    train, val, everything = keys("train"), keys("val"), keys("all")
    assert train and val and not (train & val) and train | val == everything and len(everything) == 40
    assert keys("val") == val
    n_val = sum(data.in_split(f"img/{k}", "val", 10) for k in range(20_000))
    assert 100 < n_val < 300  # ~1%


# -----------------------------------------------------------------------------
# tar shards


def write_shards(root, n_shards, per_shard, bad_key=None):
    """webdataset layout: key.jpg + key.txt (+ key.json to ignore); the caption is the key."""
    keys = []
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = b"garbage" if key == bad_key else png_bytes(noise(12, 10, seed=i), "JPEG")
                for ext, payload in (("jpg", image), ("txt", key.encode()), ("json", json.dumps({}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                if key != bad_key:
                    keys.append(key)
    return keys


@pytest.mark.parametrize("n_shards", [8, 2])  # 8: shards per (rank, worker); 2 < 4 slots: split by index
def test_tar_each_sample_once_across_ranks_and_workers(tmp_path, n_shards):
    keys = write_shards(tmp_path, n_shards, per_shard=24 // n_shards)
    seen = []
    for rank in range(2):
        ds = data.TarDataset(data.find_shards(str(tmp_path)), 8, split="all", rank=rank, world_size=2,
                             loop=False, shuffle_buffer=5)
        for images, caps in DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate):
            assert images.shape[1:] == (3, 8, 8)
            seen += caps
    assert sorted(seen) == sorted(keys)


def test_tar_skips_corrupt_members_and_shards(tmp_path):
    keys = write_shards(tmp_path, 2, per_shard=4, bad_key="000010002")
    (tmp_path / "00002.tar").write_bytes(os.urandom(2000))  # not a tar at all
    with tarfile.open(tmp_path / "00003.tar", "w") as tf:  # a caption without an image, an empty caption
        for name, payload in (("a.txt", b"lonely"), ("b.png", png_bytes(noise())), ("b.txt", b"\n")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    ds = data.TarDataset(data.find_shards(str(tmp_path)), 8, split="all", loop=False)
    assert sorted(c for _, c in ds) == sorted(keys)
    assert ds.skipped == {"unreadable image": 1, "unreadable shard": 1, "missing image": 1, "empty caption": 1}
    assert sorted(data.iter_captions(str(tmp_path / "0000[01].tar"))) == sorted(keys + ["000010002"])


def test_tar_split_disjoint(tmp_path):
    keys = write_shards(tmp_path, 2, per_shard=15)
    def caps(split):
        return {c for _, c in data.TarDataset(data.find_shards(str(tmp_path)), 4, split=split, loop=False,
                                             val_permille=300)}
    train, val = caps("train"), caps("val")
    assert train and val and not (train & val) and train | val == set(keys) and caps("val") == val


def test_find_shards(tmp_path):
    write_shards(tmp_path, 3, per_shard=1)
    names = [str(tmp_path / f"{s:05d}.tar") for s in range(3)]
    assert data.find_shards(str(tmp_path)) == names
    assert data.find_shards(str(tmp_path / "{00000..00002}.tar")) == names
    assert data.find_shards(str(tmp_path / "{00001..00002}.tar")) == names[1:]
    assert data.find_shards(str(tmp_path / "*.tar")) == names
    assert data.find_shards(names[0]) == names[:1]
    with pytest.raises(UserError, match="00009"):
        data.find_shards(str(tmp_path / "{00000..00009}.tar"))


# -----------------------------------------------------------------------------
# make_dataset and loader


def test_make_dataset_dispatch(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "tar").mkdir()
    write_folder(tmp_path / "img")
    write_shards(tmp_path / "tar", 2, per_shard=2)
    assert isinstance(data.make_dataset(str(tmp_path / "img"), 8, split="all"), data.FolderDataset)
    for spec in ("tar", "tar/00000.tar", "tar/*.tar", "tar/{00000..00001}.tar"):
        assert isinstance(data.make_dataset(str(tmp_path / spec), 8), data.TarDataset)
    assert len(list(data.iter_captions(str(tmp_path / "img")))) == 3 + 2 + 2  # one.txt has 3 lines


def test_make_dataset_shapes():
    ds = data.make_dataset("shapes", size=16, split="train")
    image, caption = ds[0]
    assert image.shape == (3, 16, 16) and isinstance(caption, str)
    assert data.make_dataset("shapes", size=16, split="heldout")[0][0].shape == (3, 16, 16)


def test_loader_infinite_batches(tmp_path):
    write_folder(tmp_path)
    ds = data.FolderDataset(str(tmp_path), size=8, split="all")  # 5 samples: 2 batches an epoch
    for images, caps in itertools.islice(data.loader(ds, batch_size=2, seed=1), 7):
        assert images.shape == (2, 3, 8, 8) and len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # two ranks see different samples within an epoch, and the same order for the same seed
    first = [next(data.loader(ds, 2, rank=r, world_size=2, seed=3))[1] for r in (0, 1, 0)]
    assert first[0] == first[2]
    with pytest.raises(UserError, match="batch size"):
        next(data.loader(ds, batch_size=8))
    tar = tmp_path / "tar"
    tar.mkdir()
    write_shards(tar, 1, per_shard=3)
    tds = data.TarDataset(data.find_shards(str(tar)), 8)
    batches = list(itertools.islice(data.loader(tds, batch_size=2, num_workers=1), 5))  # 3 samples, looped
    assert all(b[0].shape == (2, 3, 8, 8) for b in batches)
