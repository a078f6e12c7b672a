"""Byte-level BPE tokenizer for captions: trained here, run by tiktoken, offline by default.

Byte-level BPE in a few sentences. A caption is turned into its UTF-8 bytes, so 256 base tokens can
spell any text (accents, emoji, Chinese) and nothing is ever "unknown". Training then finds the most
frequent pair of adjacent tokens in the corpus, merges it into one new token (b"r" + b"ed" -> b"red"),
and repeats until the vocabulary has the size asked for. Text is first split into words by a regex
(PAT_STR, GPT-4's "cl100k" pattern), so a merge never crosses a word boundary: b" red" can become a
token, b"red circ" cannot. The result is a dict of *ranks*, token bytes -> id in the order learned,
saved in tiktoken's `.tiktoken` format (one line per token: base64(bytes) rank). tiktoken's Rust code
then encodes a word by repeatedly merging the adjacent pair whose concatenation has the lowest rank.

Ids: 0..255 are the single bytes, 256..len(ranks)-1 the learned merges, then two special tokens:
    eot_id = len(ranks)      "<|endoftext|>"  appended after every caption (CLIP reads features there)
    pad_id = len(ranks) + 1  "<|pad|>"        fills the rest of a fixed-length row
so vocab_size = len(ranks) + 2. Captions are lowercased before training and encoding, as in DALL-E
(§2.2: the caption is lowercased, then BPE-encoded into at most 256 tokens from a vocabulary of 16,384).

The shipped vocabulary vocab/default.tiktoken (4096 ranks) is made by `python scripts/make_default_vocab.py`:
it trains on shapes-style captions plus English found offline (Python's pydoc topics and
/usr/share/common-licenses); with Python 3.11 and Debian's license texts it rewrites the file byte for
byte. Named tiktoken encodings ("gpt2", "cl100k_base") work too where tiktoken has them cached; only
they may touch the network (tiktoken downloads them), never the default.

    python -m nanodalle.tokenizer --train captions.txt [more.txt a_folder/] --vocab-size 16384 --out my.tiktoken
    python -m nanodalle.tokenizer --encode "a small red circle at the top" [--vocab my.tiktoken]
"""

import argparse
import base64
import collections
import heapq
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable

import regex  # installed with tiktoken; unlike `re` it knows \p{L} (any letter) and \p{N} (any digit)
import tiktoken
import torch
from tqdm import tqdm

from nanodalle import UserError

DEFAULT_VOCAB = str(Path(__file__).parent / "vocab" / "default.tiktoken")
# GPT-4's split pattern (tiktoken_ext/openai_public.py, cl100k_base): contractions, a word with at most
# one leading non-letter (usually its space), numbers of 1-3 digits, punctuation runs, whitespace.
PAT_STR = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
EOT, PAD = "<|endoftext|>", "<|pad|>"
MIN_VOCAB = 257  # the 256 bytes and at least one merge
_warned_truncation = False  # warn about long captions once per process, not once per batch


# ----------------------------------------------------------------------------- training

def count_words(lines: Iterable[str]) -> collections.Counter:
    """Split every caption into words once; BPE then works on the distinct words and their counts."""
    pat, counts = regex.compile(PAT_STR), collections.Counter()
    for line in lines:
        counts.update(pat.findall(line.rstrip("\r\n").lower()))
    return counts


def _merge(ids: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every adjacent (a, b) in ids by new_id, left to right."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB} (256 bytes + merges)")


def train(lines: Iterable[str], vocab_size: int, verbose: bool = False) -> dict[bytes, int]:
    """Learn vocab_size mergeable ranks (256 bytes included) from captions; returns {token bytes: id}.

    Recounting every pair after every merge would be far too slow for 100 MB of captions, so we keep
    pair -> count and pair -> {words holding it}, and after a merge update only the words that had it.
    A max-heap finds the most frequent pair; ties go to the smallest (id, id) pair, so runs repeat.
    Training stops early when no pair occurs twice (merging a one-off pair only memorises it).
    """
    check_vocab_size(vocab_size)
    counts = count_words(tqdm(lines, desc="counting words", unit=" lines", disable=not verbose))
    if not counts:
        raise UserError("no text to train the tokenizer on: the captions are empty")
    words = [list(w.encode("utf-8")) for w in counts]  # each distinct word as token ids, bytes at first
    freqs = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    vocab = list(ranks)  # id -> bytes
    pair_counts, where = collections.defaultdict(int), collections.defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]  # heapq is a min-heap: negate the counts
    heapq.heapify(heap)
    bar = tqdm(total=vocab_size - 256, desc="merging", unit=" merges", disable=not verbose)
    while len(vocab) < vocab_size and heap:
        neg_count, (a, b) = heapq.heappop(heap)
        if -neg_count != pair_counts.get((a, b)):
            continue  # a stale entry: this pair's count changed after it was pushed
        if -neg_count < 2:
            break
        # Should two merges ever spell the same bytes (b"a"+b"bc", b"ab"+b"c"), reuse that token's id:
        # a .tiktoken file maps bytes -> id, so every id must have its own bytes.
        new_id = ranks.setdefault(vocab[a] + vocab[b], len(vocab))
        if new_id == len(vocab):
            vocab.append(vocab[a] + vocab[b])
            bar.update()
        delta = collections.defaultdict(int)  # how this merge changes each pair's count
        for i in where.pop((a, b)):
            old, f = words[i], freqs[i]
            new = _merge(old, a, b, new_id)
            if len(new) == len(old):
                continue  # the index may list words that lost this pair to an earlier merge
            for pair in zip(old, old[1:]):
                delta[pair] -= f
            for pair in zip(new, new[1:]):
                delta[pair] += f
                where[pair].add(i)
            words[i] = new
        for pair, d in delta.items():
            if d == 0:
                continue  # pairs away from the merge: removed and added back
            pair_counts[pair] += d
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]  # gone from every word: forget it
                where.pop(pair, None)
    bar.close()
    return ranks


# ----------------------------------------------------------------------------- the .tiktoken file

def _dumps(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def _loads(text: str, where: str = "tokenizer state") -> dict[bytes, int]:
    try:
        lines = (ln.split() for ln in text.splitlines() if ln)
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in lines}
    except ValueError:
        raise UserError(f"{where} is not a .tiktoken file (expected lines 'base64 rank')") from None
    if sorted(ranks.values()) != list(range(len(ranks))):  # special ids go right after: ranks must be 0..n-1
        raise UserError(f"{where}: token ranks must be 0..{len(ranks) - 1} with no gaps or repeats")
    return ranks


def save(ranks: dict[bytes, int], path) -> None:
    """Write ranks in tiktoken's format, atomically: a temp file renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so the rename is atomic
    tmp.write_text(_dumps(ranks), encoding="ascii")
    os.replace(tmp, path)


def load(path) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which caches by *path* in a temp
    # folder and would keep returning the old ranks after the file at that path is retrained.
    try:
        return _loads(Path(path).read_text(encoding="ascii"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {e}") from None


def _get_named_encoding(name: str) -> tiktoken.Encoding:
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"tokenizer {name!r} is neither a file nor a tiktoken encoding "
                        f"({', '.join(tiktoken.list_encoding_names())})")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # tiktoken downloads without a timeout: never hang forever offline
    try:
        return tiktoken.get_encoding(name)  # reads $TIKTOKEN_CACHE_DIR (or the temp dir) or downloads
    except Exception:
        raise UserError(f"could not load tiktoken encoding {name!r} (no network?): pass --tokenizer PATH to a "
                        f".tiktoken file, or train one with python -m nanodalle.tokenizer --train ...") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """tok = Tokenizer() (the shipped vocabulary), Tokenizer("my.tiktoken") or Tokenizer("gpt2")."""

    def __init__(self, name_or_path: str | None = None):
        spec = DEFAULT_VOCAB if name_or_path is None else str(name_or_path)
        if os.path.exists(spec) or spec.endswith(".tiktoken") or "/" in spec or os.sep in spec:
            if not os.path.isfile(spec):
                raise UserError(f"tokenizer file not found: {spec} "
                                "(train one with python -m nanodalle.tokenizer --train ...)")
            self._setup(Path(spec).stem, PAT_STR, load(spec), {})
        else:
            base = _get_named_encoding(spec)  # tiktoken's documented way to extend an encoding:
            self._setup(base.name, base._pat_str, base._mergeable_ranks, base._special_tokens)
            self._ranks = None  # a named encoding is stored in checkpoints by its name only

    def _setup(self, name, pat_str, ranks, specials):
        specials = dict(specials)
        n = max([*ranks.values(), *specials.values()]) + 1
        for tok in (EOT, PAD):  # add our two special tokens after the last id, unless already there
            if tok not in specials:
                specials[tok], n = n, n + 1
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.name, self.eot_id, self.pad_id = name, specials[EOT], specials[PAD]
        self.vocab_size = self.enc.n_vocab
        self._special_ids = set(specials.values())
        self._ranks = ranks

    def state(self) -> dict:
        """Small enough to save in a checkpoint; from_state rebuilds the same tokenizer without the file."""
        if self._ranks is None:
            return {"name": self.name, "tiktoken_encoding": self.name}
        return {"name": self.name, "ranks_b64": _dumps(self._ranks)}

    @classmethod
    def from_state(cls, d: dict) -> "Tokenizer":
        if "ranks_b64" not in d:
            return cls(d["tiktoken_encoding"])
        tok = cls.__new__(cls)
        tok._setup(d["name"], PAT_STR, _loads(d["ranks_b64"]), {})
        return tok

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a caption that happens to contain "<|endoftext|>" is just text
        return self.enc.encode_ordinary(text.lower())

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self.enc.decode([i for i in ids if i not in self._special_ids])

    def encode_batch(self, texts: list[str], length: int) -> torch.Tensor:
        """(B, length) LongTensor: each caption's tokens, then eot, then pad to the end of the row."""
        global _warned_truncation
        if length < 1:
            raise ValueError(f"length must be at least 1 (room for the eot token), got {length}")
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)  # (B, T)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length - 1:  # keep the eot: CLIP reads the caption's features there
                if not _warned_truncation:
                    warnings.warn(f"a caption has more than {length - 1} tokens and was cut to fit the text "
                                  f"length {length}; raise it with --text-len (warned once)", stacklevel=2)
                    _warned_truncation = True
                ids = ids[: length - 1]
            out[row, : len(ids) + 1] = torch.tensor(ids + [self.eot_id])
        return out

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of the eot token in each (B, T) row; the last position if a row has none."""
        return eot_positions(ids, self.eot_id)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id}, pad_id={self.pad_id})"


def eot_positions(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B,) index of the first eot token in each (B, T) row of ids, the last position if a row has none
    (a caption cut to fit): CLIP reads a caption's features there, whatever padding follows."""
    is_eot = ids == eot_id  # (B, T)
    first = is_eot.int().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(is_eot.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))


# ----------------------------------------------------------------------------- command line

def caption_files(paths: list[str]) -> list[Path]:
    """Files as given, and every .txt under a folder (an image folder has a same-stem .txt per image)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                raise UserError(f"no .txt caption files under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"caption file not found: {p}")
    return files


def read_lines(files: list[Path]) -> Iterable[str]:
    for f in files:  # streamed line by line: 100 MB of captions never sits in memory as one string
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield from fh


def _show(tok: Tokenizer, text: str) -> None:
    """Print the ids and the piece of text each stands for; a token that holds only part of a
    multi-byte character (an emoji is 4 bytes) is shown as its bytes in hex, like <f0>."""
    ids, pieces = tok.encode(text), []
    for i in ids:
        piece = tok.enc.decode_single_token_bytes(i)
        try:
            pieces.append(piece.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("".join(f"<{byte:02x}>" for byte in piece))
    print(f"{len(ids)} tokens: {ids}\n{'|'.join(pieces)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanodalle.tokenizer", description="Train or try a BPE tokenizer.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", nargs="+", metavar="PATH",
                      help="caption files (one caption per line) or folders of .txt files")
    mode.add_argument("--encode", metavar="TEXT", help="show the tokens of TEXT")
    p.add_argument("--vocab-size", type=int, default=16384,
                   help="mergeable tokens incl. the 256 bytes (DALL-E: 16384)")
    p.add_argument("--out", default="tokenizer.tiktoken", help="where --train writes the vocabulary")
    p.add_argument("--vocab", "--tokenizer", dest="vocab",
                   help="for --encode: a .tiktoken file or a tiktoken encoding name (default: the shipped one)")
    args = p.parse_args(argv)
    try:
        if args.encode is not None:
            tok = Tokenizer(args.vocab)
            print(tok)
            _show(tok, args.encode)
            return
        check_vocab_size(args.vocab_size)  # fail before reading any caption
        files = caption_files(args.train)
        if all(f.stat().st_size == 0 for f in files):
            raise UserError(f"the caption files are empty: {', '.join(map(str, files[:3]))}")
        t0 = time.time()
        ranks = train(read_lines(files), args.vocab_size, verbose=True)
        save(ranks, args.out)
        tok = Tokenizer(args.out)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"trained {len(ranks)} tokens (256 bytes + {len(ranks) - 256} merges) on {mb:.1f} MB in "
              f"{len(files)} file(s) in {time.time() - t0:.1f}s -> {args.out}")
        if len(ranks) < args.vocab_size:
            print(f"stopped before {args.vocab_size}: no pair of tokens occurs twice any more")
        print(f"{tok}")
        _show(tok, next((ln.strip() for ln in read_lines(files) if ln.strip()), "a small red circle"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
