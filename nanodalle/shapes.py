"""Shapes: the built-in procedural captioned image data set, and a judge that scores generated images.

The data set. Each picture shows one or two flat coloured shapes on a plain background, with a caption:

    "a small red circle at the top"                     one object: size, colour, shape, position
    "there is a big green star on the left"
    "a small red circle to the left of a large blue square on a white background"
    "a large blue square to the right of a small red circle"   (the same scene, said the other way round)

Captions state every attribute of every object (size, colour, shape, and the position for one object or
the relation for two), and sometimes the background. So a model must bind each colour to the right shape
and place it: the things text-to-image models find hard. The vocabulary is about forty words, small enough
for a toy model to learn on a laptop CPU in minutes. Nothing is stored: example `i` of a split is drawn
from a random generator seeded by (split, i), so it is the same picture and caption on every machine.
Geometry is in fractions of the image side, so any size renders (32 px by default; 64, 128, 256...).

The held-out split. A few colour-shape pairs (HELDOUT_PAIRS, about 10% of all pairs) never appear in
"train"; every colour and every shape still does. Splits:
    "train"    the training stream (indices 0, 1, 2, ...), seen pairs only;
    "val"      the same distribution from differently seeded generators: a disjoint evaluation stream;
    "heldout"  scenes that contain at least one held-out pair: does the model compose "purple" and
               "circle" when it has only seen purple things and circles apart?

The judge. `judge(image, scene)` says which attributes of `scene` an image shows, for scoring generated
images. Anti-aliasing and blur mix an object's colour with the background, so each pixel is assigned to the
nearest *line segment* from the background colour to an object colour; how far along it lies is how much
of the pixel the object covers. A connected region of one colour covering pixels more than half is an
object. For each shape, a box of that shape with the object's area and centre of mass is drawn and compared
with it (soft IoU); the best shape names the object, and its box gives the size and position. Only what
the caption states is judged (plus "count": no missing or extra objects). Ground-truth renders pass
~100% at 32 and 64 px, a render with one attribute changed fails on it, and mild noise and blur pass.
"""
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary
# Object colours are saturated and far apart in RGB, and far from every mixture of another colour with
# a background, so a blurry or noisy generated pixel still has one clear nearest colour.
COLORS = {"red": (225, 20, 20), "green": (40, 190, 60), "blue": (20, 80, 250), "yellow": (250, 230, 0),
          "purple": (130, 30, 220), "orange": (255, 125, 0), "cyan": (30, 210, 220), "pink": (255, 90, 210)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}  # neutral only
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]  # silhouettes distinct even at 8 px
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]  # "A <relation> B"
SPLITS = ("train", "val", "heldout")
# never in "train": 5 of the 48 pairs, one per colour and shape at most, so all still appear in training
HELDOUT_PAIRS = [("red", "star"), ("green", "heart"), ("blue", "triangle"), ("yellow", "cross"),
                 ("purple", "circle")]
_ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_SEEN_PAIRS = [p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS]

_SIZE_WORDS = {"small": ["small"], "large": ["large", "big"]}
_POSITION_WORDS = {"left": ["on the left"], "right": ["on the right"], "top": ["at the top"],
                   "bottom": ["at the bottom"], "center": ["in the center", "in the middle"]}
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}

# ----------------------------------------------------------------------------- geometry (fractions of the side)
SIZE_FRAC = {"small": 0.27, "large": 0.45}  # bounding-box side of an object
_SIZE_SPLIT = (SIZE_FRAC["small"] + SIZE_FRAC["large"]) / 2  # the judge: small below, large above
_MARGIN, _GAP = 0.02, 0.04                  # to the image edge; between two objects
_JITTER, _JITTER_ACROSS = 0.05, 0.08        # random offsets, small enough to keep positions unambiguous
_CENTER_RADIUS = 0.12                       # judge: a box centre this close to the middle is "center"
_POSITION_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                "center": (0.5, 0.5)}
_SS = 4  # draw at 4x, then average 4x4 blocks: anti-aliased edges


def _unit_polygons():
    """Each polygon shape as points in the box [-1, 1]^2 (y points down), stretched to fill the box."""
    def fit(pts):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [(2 * (x - min(xs)) / (max(xs) - min(xs)) - 1, 2 * (y - min(ys)) / (max(ys) - min(ys)) - 1)
                for x, y in pts]
    # 5-pointed star, point up: outer radius 1, inner 0.5 (fat points survive at 8 px)
    star = [((1.0 if k % 2 == 0 else 0.5) * math.cos(math.pi * (k / 5 - 0.5)),
             (1.0 if k % 2 == 0 else 0.5) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
    # the classic heart curve, y flipped so the point is at the bottom
    ts = [2 * math.pi * k / 48 for k in range(48)]
    heart = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
             for t in ts]
    w = 0.36  # half the thickness of a cross arm
    cross = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
             (-w, w), (-1, w), (-1, -w), (-w, -w)]
    return {"triangle": [(0, -1), (1, 1), (-1, 1)], "star": fit(star), "heart": fit(heart), "cross": cross}


_POLYGONS = _unit_polygons()


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    position: str | None = None  # None in two-object scenes: the relation places them


@dataclass
class Scene:
    objects: list[Obj]
    relation: str | None  # objects[0] <relation> objects[1]; None for one object
    background: str
    mention_background: bool  # whether the caption names the background (only then is it judged)


# ----------------------------------------------------------------------------- sampling and captions
def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """Draw a random scene of `split`: 1 or 2 objects of different colours, sizes, a position or relation."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    n = rng.choice((1, 2))
    objects = []
    for k in range(n):
        if split == "heldout":  # the first object drawn is a held-out pair, the other may be anything
            pairs = HELDOUT_PAIRS if k == 0 else _ALL_PAIRS
        else:
            pairs = _SEEN_PAIRS
        used = [o.color for o in objects]
        color, shape = rng.choice([p for p in pairs if p[0] not in used])
        objects.append(Obj(color, shape, rng.choice(SIZES)))
    rng.shuffle(objects)  # so in "heldout" the held-out pair is not always first
    relation = None
    if n == 1:
        objects[0].position = rng.choice(POSITIONS)
    else:
        relation = rng.choice(RELATIONS)
    return Scene(objects, relation, rng.choice(list(BACKGROUNDS)), rng.random() < 0.5)


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several lowercase templates stating every attribute of `scene` (the background if mentioned)."""
    def words(o):
        return f"{rng.choice(_SIZE_WORDS[o.size])} {o.color} {o.shape}"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        what, where = words(o), rng.choice(_POSITION_WORDS[o.position])
        text = rng.choice([f"a {what} {where}", f"there is a {what} {where}", f"{where} there is a {what}"])
    else:
        a, b = scene.objects
        rel = scene.relation
        if rng.random() < 0.5:  # "A left of B" is the same scene as "B right of A"
            a, b, rel = b, a, _INVERSE[rel]
        text = rng.choice([f"a {words(a)} {rel} a {words(b)}", f"there is a {words(a)} {rel} a {words(b)}"])
    if scene.mention_background:
        text += rng.choice([" on a {} background", " with a {} background"]).format(scene.background)
    return text


def hard_negative(text: str, rng: random.Random) -> str:
    """A caption one edit away from `text` that its image does not show: one object's shape word replaced
    by another shape, or (two objects, half the time) the two colour words swapped.

    For CLIP's training, as NegCLIP's swapped captions (Yuksekgonul et al. 2023 §5): a random batch seldom
    holds two captions that differ only in one shape, so the plain contrastive loss is solved by colour and
    place and never asks the image encoder for the exact outline, which is what reranking DALL-E 1's
    samples needs. No edit makes a held-out colour-shape pair, so training never reads one."""
    words = text.split(" ")
    at = [i for i, w in enumerate(words) if w in SHAPES and words[i - 1] in COLORS]  # "... red star ..."
    if not at:
        raise ValueError(f"not a caption of the built-in shapes: {text!r}")

    def allowed(color, shape):
        return (color, shape) not in HELDOUT_PAIRS

    if len(at) == 2 and rng.random() < 0.5:
        a, b = at
        if allowed(words[b - 1], words[a]) and allowed(words[a - 1], words[b]):
            words[a - 1], words[b - 1] = words[b - 1], words[a - 1]
            return " ".join(words)
    i = rng.choice(at)
    words[i] = rng.choice([s for s in SHAPES if s != words[i] and allowed(words[i - 1], s)])
    return " ".join(words)


# ----------------------------------------------------------------------------- rendering
def _layout(scene: Scene, rng: random.Random | None) -> list[tuple[float, float, float]]:
    """(x, y, side) of each object's bounding box, in fractions of the image; rng=None gives no jitter."""
    def u(lo, hi):
        return rng.uniform(lo, hi) if rng is not None else (lo + hi) / 2

    def inside(v, s):  # keep the whole box inside the image
        return min(max(v, _MARGIN + s / 2), 1 - _MARGIN - s / 2)
    sides = [SIZE_FRAC[o.size] for o in scene.objects]
    if len(scene.objects) == 1:
        (x, y), s = _POSITION_XY[scene.objects[0].position], sides[0]
        return [(inside(x + u(-_JITTER, _JITTER), s), inside(y + u(-_JITTER, _JITTER), s), s)]
    # two objects: along the relation's axis the first sits near one edge, the second near the other,
    # each pushed a random amount towards the middle but never closer than _GAP; across, small jitter
    first, second = (0, 1) if scene.relation in ("to the left of", "above") else (1, 0)
    free = 1 - 2 * _MARGIN - sides[0] - sides[1] - _GAP
    along = [0.0, 0.0]
    along[first] = _MARGIN + sides[first] / 2 + u(0, free / 2)
    along[second] = 1 - _MARGIN - sides[second] / 2 - u(0, free / 2)
    across = [inside(0.5 + u(-_JITTER_ACROSS, _JITTER_ACROSS), s) for s in sides]
    horizontal = scene.relation in ("to the left of", "to the right of")
    return [(along[i], across[i], sides[i]) if horizontal else (across[i], along[i], sides[i]) for i in range(2)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, side: float, fill) -> None:
    """Draw `shape` filling the square box of `side` pixels centred at (x, y)."""
    # PIL fills whole pixels int(a)..int(b) inclusive, so the box [x - r, x + r) is drawn as [x - r, x + r - 1]
    x, y, r = x - 0.5, y - 0.5, side / 2 - 0.5
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x + r * px, y + r * py) for px, py in _POLYGONS[shape]], fill=fill)


def render(scene: Scene, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """Draw `scene` as a (size, size, 3) uint8 image; `rng` jitters the positions (None: canonical layout)."""
    big = size * _SS
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for o, (x, y, s) in zip(scene.objects, _layout(scene, rng)):
        _draw(draw, o.shape, x * big, y * big, s * big, COLORS[o.color])
    return np.asarray(im.resize((size, size), Image.BOX))  # BOX = mean of each 4x4 block


def _record(index: int, split: str) -> tuple[random.Random, Scene, str]:
    # a str seed is hashed with SHA-512, so it is stable across runs and machines, and "val:7" and
    # "train:7" give unrelated streams
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    rng = random.Random(f"{split}:{index}")
    scene = sample_scene(rng, split)
    return rng, scene, caption(scene, rng)


def example(index: int, split: str = "train", size: int = 32) -> tuple[np.ndarray, str, Scene]:
    """Example `index` of `split`: (image (H, W, 3) uint8, caption, scene). The same on every call."""
    rng, scene, text = _record(index, split)
    return render(scene, size, rng), text, scene


def eval_records(split: str, n: int) -> list[tuple[str, Scene]]:
    """The first n (caption, scene) pairs of `split`: a fixed evaluation set (no rendering needed)."""
    records = []
    for i in range(n):
        _, scene, text = _record(i, split)
        records.append((text, scene))
    return records


class ShapesDataset(torch.utils.data.Dataset):
    """Items (image (3, H, W) float32 in [-1, 1], caption) of a split; `length` caps the endless stream."""

    def __init__(self, split: str = "train", size: int = 32, length: int = 100_000):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        self.split, self.size, self.length = split, size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        img, text, _ = example(i, self.split, self.size)
        # (H, W, 3) -> (3, H, W), [0, 255] -> [-1, 1]; in numpy: torch is slow at casting a permuted view
        x = img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        return torch.from_numpy(x), text

    def scene(self, i: int) -> Scene:
        return _record(i, self.split)[1]


# ----------------------------------------------------------------------------- the judge
def _to_uint8(image) -> np.ndarray:
    """A torch (3, H, W) float in [-1, 1] or a numpy (H, W, 3) uint8 image -> numpy (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        x = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
        return x.round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"judge wants (H, W, 3) uint8 or (3, H, W) float in [-1, 1], got {image.dtype} {image.shape}")
    return image


def _segment(px: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index of the nearest background->colour segment, and how far along it the pixel
    lies (0 = background, 1 = pure colour), which is the fraction of the pixel the object covers."""
    cols = np.array(list(COLORS.values()), dtype=np.float32) - bg  # (8, 3) segment directions
    p = px.reshape(-1, 3) - bg                                      # (H*W, 3)
    t = np.clip(p @ cols.T / (cols * cols).sum(1), 0, 1)            # (H*W, 8) how far along each segment
    dist = ((p[:, None, :] - t[:, :, None] * cols[None]) ** 2).sum(2)  # (H*W, 8) squared distance to it
    label = dist.argmin(1)
    cover = t[np.arange(len(label)), label]
    return label.reshape(px.shape[:2]), cover.reshape(px.shape[:2])


def _neighbourhood(a: np.ndarray, fill) -> list[np.ndarray]:
    """The 9 copies of `a` shifted by -1, 0, +1 pixels in y and x (`fill` comes in at the edges)."""
    H, W = a.shape
    pad = np.pad(a, 1, constant_values=fill)
    return [pad[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean mask, as masks: every pixel repeatedly takes the smallest
    label among its neighbours until nothing changes; then each label left is one region."""
    none = mask.size
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        new = np.where(mask, np.minimum.reduce(_neighbourhood(lab, none)), none)
        if (new == lab).all():
            return [lab == v for v in np.unique(lab[mask])]
        lab = new


def _coverage(shape: str, x: float, y: float, side: float, size: int) -> np.ndarray:
    """The ideal coverage (0..1 per pixel) of `shape` in the box of `side` pixels centred at (x, y)."""
    im = Image.new("L", (size * _SS, size * _SS), 0)
    _draw(ImageDraw.Draw(im), shape, x * _SS, y * _SS, side * _SS, 255)
    return np.asarray(im.resize((size, size), Image.BOX), dtype=np.float32) / 255


def _moments(cover: np.ndarray) -> tuple[float, float, float]:
    """Area (in pixels) and centre of mass (x, y) of a coverage map; pixel i spans [i, i + 1)."""
    ys, xs = np.indices(cover.shape)
    area = cover.sum()
    return area, ((xs + 0.5) * cover).sum() / area, ((ys + 0.5) * cover).sum() / area


# Each shape's area as a fraction of its box, and its centre of mass relative to the box centre in
# units of the box side (a triangle is bottom-heavy, a heart top-heavy): measured once on a large render.
_SHAPE_MOMENTS = {}
for _shape in SHAPES:
    _a, _x, _y = _moments(_coverage(_shape, 32, 32, 48, 64))
    _SHAPE_MOMENTS[_shape] = (_a / 48 ** 2, (_x - 32) / 48, (_y - 32) / 48)


def _measure(cover: np.ndarray) -> dict:
    """Shape, size, position and box centre of one object, given its coverage map.

    For each shape, place a box of that shape with the same area and centre of mass as the object
    (moments survive blur, so this works on soft generated images too), draw it, and score the overlap
    (soft IoU). The best shape wins; its box gives size and position."""
    H = cover.shape[0]
    area, mx, my = _moments(cover)
    best = (-1.0, None, 0.0, 0.0, 0.0)
    for shape, (fill, ox, oy) in _SHAPE_MOMENTS.items():
        side = math.sqrt(area / fill)
        x, y = mx - ox * side, my - oy * side
        ideal = _coverage(shape, x, y, side, H)
        iou = np.minimum(ideal, cover).sum() / np.maximum(ideal, cover).sum()
        best = max(best, (iou, shape, side, x, y))
    _, shape, side, x, y = best
    dx, dy = x / H - 0.5, y / H - 0.5
    if max(abs(dx), abs(dy)) < _CENTER_RADIUS:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return {"shape": shape, "size": "large" if side / H > _SIZE_SPLIT else "small",
            "position": position, "xy": (x, y)}


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How box centre a lies relative to b, along the axis where they differ most."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def judge(image, scene: Scene) -> dict:
    """Which attributes of `scene` the image shows: {"color", "shape", "size", "position", "relation",
    "background", "count", "full": bool}. Attributes the caption does not state count as True;
    "count" is False when the image holds a different number of objects; "full" = all True."""
    img = _to_uint8(image)
    if img.shape[0] > 64:  # judge at 64 px at most: enough detail, and fast
        img = np.asarray(Image.fromarray(img).resize((64, 64), Image.BOX))
    H = img.shape[0]
    px = img.astype(np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])  # objects rarely touch the edge
    bg = np.median(border, axis=0)
    label, cover = _segment(px, bg)
    # objects: connected regions of one colour covering pixels more than half, ignoring specks (noise)
    # under a third of a small star; each keeps the soft coverage of its pixels and a 1-pixel rim
    min_area = max(3, 0.1 * (SIZE_FRAC["small"] * H) ** 2)
    blobs = []
    for k, name in enumerate(COLORS):
        mask = (cover > 0.5) & (label == k)
        if mask.sum() < min_area:  # most colours are absent: skip them quickly
            continue
        for m in _components(mask):
            if m.sum() >= min_area:
                rim = np.maximum.reduce(_neighbourhood(m, False))
                blobs.append((name, np.where(rim & (label == k), cover, 0)))
    blobs.sort(key=lambda b: -b[1].sum())
    # match each object to the largest region of its colour; an object whose colour is missing is
    # measured on the largest region left, so its shape, size and position are still scored
    match = [next((j for j, (name, _) in enumerate(blobs) if name == o.color), None) for o in scene.objects]
    rest = [j for j in range(len(blobs)) if j not in match]
    match = [j if j is not None else (rest.pop(0) if rest else None) for j in match]
    res = {k: True for k in ("color", "shape", "size", "position", "relation", "background", "count")}
    seen = []
    for o, j in zip(scene.objects, match):
        got = _measure(blobs[j][1]) if j is not None else None
        seen.append(got)
        res["color"] &= j is not None and blobs[j][0] == o.color
        res["shape"] &= got is not None and got["shape"] == o.shape
        res["size"] &= got is not None and got["size"] == o.size
        if o.position is not None:
            res["position"] &= got is not None and got["position"] == o.position
    if scene.relation is not None:
        res["relation"] = None not in seen and _relation(seen[0]["xy"], seen[1]["xy"]) == scene.relation
    if scene.mention_background:
        names = list(BACKGROUNDS)
        dist = [((bg - np.array(BACKGROUNDS[n])) ** 2).sum() for n in names]
        res["background"] = names[int(np.argmin(dist))] == scene.background
    res["count"] = len(blobs) == len(scene.objects)
    res = {k: bool(v) for k, v in res.items()}
    res["full"] = all(res.values())
    return res


def judge_batch(images, scenes) -> dict[str, float]:
    """Fraction of images judged correct, per attribute (keys as in `judge`)."""
    results = [judge(img, sc) for img, sc in zip(images, scenes)]
    if not results:
        raise ValueError("judge_batch got no images")
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def attribute_prompts(attr: str) -> tuple[list[str], list[str]]:
    """Class names and one prompt per class for CLIP zero-shot classification of one attribute."""
    if attr == "color":
        names, prompts = list(COLORS), [f"a photo of a {c} shape" for c in COLORS]
    elif attr == "shape":
        names, prompts = list(SHAPES), [f"a photo of a {s}" for s in SHAPES]
    elif attr == "size":
        names, prompts = list(SIZES), [f"a photo of a {s} shape" for s in SIZES]
    elif attr == "position":
        names, prompts = list(POSITIONS), [f"a photo of a shape {_POSITION_WORDS[p][0]}" for p in POSITIONS]
    elif attr == "background":
        names, prompts = list(BACKGROUNDS), [f"a photo of a shape on a {b} background" for b in BACKGROUNDS]
    else:
        raise ValueError(f"unknown attribute {attr!r}; use color, shape, size, position or background")
    return names, prompts


def zero_shot_prompts(attr: str) -> list[list[str]]:
    """For each class of attribute_prompts(attr): every single-object caption naming it, in the captions' own
    words (a toy text encoder has never read "a photo of a red shape"). Scored as an ensemble (CLIP §3.1.4)."""
    names, _ = attribute_prompts(attr)
    scenes = [dict(size=size, color=color, shape=shape, position=pos) for size in SIZES
              for color in COLORS for shape in SHAPES for pos in POSITIONS]
    return [[f"a {s['size']} {s['color']} {s['shape']} {_POSITION_WORDS[s['position']][0]}" for s in scenes
             if s[attr] == name] for name in names]
