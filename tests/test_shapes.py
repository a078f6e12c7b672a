"""Tests for the built-in shapes data set and its judge (nanodalle/shapes.py)."""
import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from nanodalle import shapes as S


def test_deterministic_and_splits_differ():
    img1, cap1, sc1 = S.example(7, "train")
    img2, cap2, sc2 = S.example(7, "train")
    assert np.array_equal(img1, img2) and cap1 == cap2 and sc1 == sc2
    same = sum(S.example(i, "train")[1] == S.example(i, "val")[1] for i in range(50))
    assert same < 5  # train and val are different streams
    assert S.eval_records("val", 20) == [S.example(i, "val")[1:] for i in range(20)]
    with pytest.raises(ValueError):
        S.example(0, "test")


def test_heldout_pairs():
    def pairs(records):
        return [{(o.color, o.shape) for o in sc.objects} for _, sc in records]
    train = pairs(S.eval_records("train", 5000))
    assert not any(p & set(S.HELDOUT_PAIRS) for p in train)  # never in train
    assert all(p & set(S.HELDOUT_PAIRS) for p in pairs(S.eval_records("heldout", 500)))
    seen = set().union(*train)
    assert {c for c, _ in seen} == set(S.COLORS) and {s for _, s in seen} == set(S.SHAPES)
    assert not any(p & set(S.HELDOUT_PAIRS) for p in pairs(S.eval_records("val", 500)))


def test_scenes_and_captions():
    assert len(S.COLORS) >= 8 and len(S.SHAPES) >= 5 and len(S.BACKGROUNDS) >= 3
    assert not set(S.COLORS) & set(S.BACKGROUNDS)
    n_objects = set()
    for text, sc in S.eval_records("train", 500) + S.eval_records("heldout", 100):
        assert text == text.lower()
        n_objects.add(len(sc.objects))
        for o in sc.objects:  # each object's size, colour and shape, bound together
            assert any(f"{w} {o.color} {o.shape}" in text for w in S._SIZE_WORDS[o.size])
        if len(sc.objects) == 1:
            assert sc.relation is None and sc.objects[0].position in S.POSITIONS
            assert any(words in text for words in S._POSITION_WORDS[sc.objects[0].position])
        else:
            assert sc.objects[0].color != sc.objects[1].color
            assert all(o.position is None for o in sc.objects) and sc.relation in S.RELATIONS
            assert sc.relation in text or S._INVERSE[sc.relation] in text
        assert (sc.background in text) == sc.mention_background
    assert n_objects == {1, 2}
    vocab = {w for text, _ in S.eval_records("train", 2000) for w in text.split()}
    assert len(vocab) < 60  # a small vocabulary that toy models learn quickly


def test_hard_negative_is_one_edit_the_image_does_not_show():
    def named(words):  # the (colour, shape) pairs a caption names, in its order
        return [(words[k - 1], words[k]) for k in range(1, len(words)) if words[k] in S.SHAPES]
    rng = random.Random(0)
    kinds = set()
    for text, sc in S.eval_records("train", 400):
        neg = S.hard_negative(text, rng)
        a, b = text.split(" "), neg.split(" ")
        assert len(a) == len(b) and neg != text
        changed = [i for i in range(len(a)) if a[i] != b[i]]
        if len(changed) == 1:  # one shape word replaced by another shape
            assert a[changed[0]] in S.SHAPES and b[changed[0]] in S.SHAPES
            kinds.add("shape")
        else:  # the two objects' colours swapped
            i, j = changed
            assert len(sc.objects) == 2 and (b[i], b[j]) == (a[j], a[i]) and a[i] in S.COLORS
            kinds.add("swap")
        # the negative names no held-out pair (CLIP trains on it), and in the caption's order the objects it
        # names differ from the scene's (the same shapes with colours swapped: the relation no longer holds)
        assert not set(named(b)) & set(S.HELDOUT_PAIRS)
        assert sorted(named(a)) == sorted((o.color, o.shape) for o in sc.objects) and named(b) != named(a)
    assert kinds == {"shape", "swap"}
    with pytest.raises(ValueError):
        S.hard_negative("a photo of my cat", rng)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_render_sizes(size):
    img, _, sc = S.example(3, "train", size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2  # background, object, anti-aliased edges
    if size >= 128:
        assert S.judge(img, sc)["full"]  # the judge works at any size


def test_dataset():
    ds = S.ShapesDataset("val", size=32, length=10)
    assert len(ds) == 10
    x, text = ds[4]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert -1 <= x.min() and x.max() <= 1 and x.max() > x.min()
    _, text2, scene = S.example(4, "val")
    assert text == text2 and ds.scene(4) == scene
    assert S.judge(x, scene)["full"]  # the judge reads tensors in [-1, 1] too
    batch = torch.stack([ds[i][0] for i in range(8)])
    assert S.judge_batch(batch, [ds.scene(i) for i in range(8)])["full"] == 1.0


@pytest.mark.parametrize("size,n", [(32, 300), (64, 150)])
def test_judge_ground_truth(size, n):
    for split in S.SPLITS:
        images, scenes = zip(*[S.example(i, split, size)[::2] for i in range(n)])
        acc = S.judge_batch(images, scenes)
        assert acc["full"] >= 0.99, (split, acc)


def _swap(scene, attr, rng):
    """A copy of `scene` with one attribute of one object changed; returns (scene, judged key)."""
    sc = copy.deepcopy(scene)
    o = rng.choice(sc.objects)
    if attr == "color":
        o.color = rng.choice([c for c in S.COLORS if c not in [x.color for x in scene.objects]])
    elif attr == "shape":
        o.shape = rng.choice([s for s in S.SHAPES if s != o.shape])
    elif attr == "size":
        o.size = "small" if o.size == "large" else "large"
    elif sc.relation is None:
        o.position = rng.choice([p for p in S.POSITIONS if p != o.position])
    else:
        sc.relation = rng.choice([r for r in S.RELATIONS if r != scene.relation])
        return sc, "relation"
    return sc, attr


@pytest.mark.parametrize("size", [32, 64])
def test_judge_rejects_wrong_renders(size):
    rng = random.Random(0)
    rejected, total = {}, {}
    for _, scene in S.eval_records("val", 100 if size == 32 else 40):
        for attr in ("color", "shape", "size", "position"):
            wrong, key = _swap(scene, attr, rng)
            res = S.judge(S.render(wrong, size, random.Random(1)), scene)
            rejected[key] = rejected.get(key, 0) + (not res[key] and not res["full"])
            total[key] = total.get(key, 0) + 1
    rate = {k: rejected[k] / total[k] for k in total}
    assert rate["color"] == 1.0, rate
    assert min(rate.values()) >= 0.95, rate


def test_judge_rejects_blank_and_extra_objects():
    _, _, scene = S.example(0, "val")
    blank = np.full((32, 32, 3), S.BACKGROUNDS[scene.background], np.uint8)
    res = S.judge(blank, scene)
    assert not res["color"] and not res["full"]
    one = next(sc for _, sc in S.eval_records("val", 50) if len(sc.objects) == 1)
    two = copy.deepcopy(one)
    two.objects.append(S.Obj(next(c for c in S.COLORS if c != one.objects[0].color), "square", "small"))
    two.objects[0].position, two.relation = None, "to the left of"
    assert not S.judge(S.render(two), one)["count"]  # an extra object is noticed


def test_judge_tolerates_noise_and_blur():
    rng = np.random.default_rng(0)
    images, scenes = [], []
    for i in range(150):
        img, _, scene = S.example(i, "val", 32)
        im = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.5))
        x = np.asarray(im) / 255 + rng.normal(0, 0.05, img.shape)  # std 0.05 in [0, 1] units
        images.append((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
        scenes.append(scene)
    assert S.judge_batch(images, scenes)["full"] >= 0.95


def test_attribute_prompts():
    for attr in ("color", "shape", "size", "position", "background"):
        names, prompts = S.attribute_prompts(attr)
        assert len(names) == len(prompts) == len(set(prompts)) >= 2
        assert all(n in p or attr == "position" for n, p in zip(names, prompts))
    with pytest.raises(ValueError):
        S.attribute_prompts("mood")
