"""Regenerate nanodalle/vocab/default.tiktoken, the tokenizer every model uses unless told otherwise.

    python scripts/make_default_vocab.py [--out nanodalle/vocab/default.tiktoken] [--vocab-size 4096]

The corpus is built offline, deterministically, from two parts:
  (a) 20,000 captions in the style of the built-in shapes data set ("a small red circle at the top"),
      so every colour, shape, size and position word becomes a single token;
  (b) English text that ships with the machine, so real captions still tokenize reasonably: the help
      topics bundled with Python (pydoc_data/topics.py) and the license texts in /usr/share/common-licenses.
Part (b) depends on the Python version and the OS, so the file comes out byte-identical only on the same
setup (the shipped file: Python 3.11, Debian's common-licenses); the script prints the file's sha256.
"""

import argparse
import hashlib
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nanodalle.tokenizer import DEFAULT_VOCAB, Tokenizer, save, train  # noqa: E402

COLOURS = "red green blue yellow purple orange cyan pink white black gray grey".split()
SHAPES = "circle square triangle star heart cross".split()
SIZES = "small large big tiny".split()
PLACES = ["at the top", "at the bottom", "on the left", "on the right", "in the centre", "in the center",
          "in the middle", "at the top left", "at the bottom right", "in the middle of the image"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def thing():  # "a small red circle" / "a blue square"
        size = rng.choice(SIZES) + " " if rng.random() < 0.6 else ""
        return f"a {size}{rng.choice(COLOURS)} {rng.choice(SHAPES)}"

    templates = [
        lambda: f"{thing()} {rng.choice(PLACES)}",
        lambda: f"there is {thing()} {rng.choice(PLACES)}",
        lambda: f"{thing()} {rng.choice(RELATIONS)} {thing()}",
        lambda: f"{thing()} {rng.choice(RELATIONS)} {thing()} on a {rng.choice(COLOURS)} background",
        lambda: f"{thing()} on a {rng.choice(COLOURS)} background",
        lambda: f"a photo of a {rng.choice(COLOURS)} shape",
        lambda: f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}",  # words at the very start
        lambda: f"{rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}",
    ]
    return [rng.choice(templates)() for _ in range(n)]


def english_lines() -> list[str]:
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    licenses = sorted(Path("/usr/share/common-licenses").glob("*"))
    texts += [p.read_text(errors="replace") for p in licenses if p.is_file()]
    # one stripped line per "caption": indentation and blank lines are not what captions look like
    return [ln.strip() for text in texts for ln in text.splitlines() if ln.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_VOCAB)
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    shapes, english = shapes_captions(20_000), english_lines()
    print(f"corpus: {len(shapes)} shapes captions, {len(english)} lines of English "
          f"({sum(map(len, english)) / 1e6:.2f} MB, Python {sys.version.split()[0]})")
    save(train(shapes + english, args.vocab_size, verbose=True), args.out)
    print(f"wrote {args.out}: sha256 {hashlib.sha256(Path(args.out).read_bytes()).hexdigest()}")
    tok = Tokenizer(args.out)
    for caption in ["a small red circle at the top", "a red circle to the left of a blue square on a white background"]:
        ids = tok.encode(caption)
        print(f"{len(ids):3d} tokens: " + "|".join(tok.decode([i]) for i in ids))


if __name__ == "__main__":
    main()
