"""Tests for nanodalle/tokenizer.py: byte-level BPE training, the .tiktoken file, the Tokenizer API, the CLI."""

import collections
import inspect
import json
import random
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe
import torch

from conftest import ROOT
from nanodalle import UserError
from nanodalle import tokenizer as T
from nanodalle.tokenizer import DEFAULT_VOCAB, PAT_STR, Tokenizer, load, main, save, train

TEXTS = ["Hello World", "A small RED circle at the TOP", "café crème brûlée", "日本語のキャプション",
         "emoji 🎨🐶👩‍👩‍👧 mixed", "tabs\tand  double  spaces ", "numbers 1234567 and 3.14",
         "İstanbul ΣΊΣΥΦΟΣ", "<|endoftext|> is just text, not a special token", "", "\n"]


def corpus(n=300, seed=0):
    """Small captions with repeated words (so there is plenty to merge), some unicode and digits."""
    rng = random.Random(seed)
    words = "a the red blue green circle square star small large left right of on at top bottom café 日本 42 🐶".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------- a naive reference BPE

def naive_merge(word, pair, new_id):
    res, i = [], 0  # left to right, written differently from the module's _merge on purpose
    while i < len(word):
        if word[i:i + 2] == list(pair):
            res.append(new_id)
            i += 2
        else:
            res.append(word[i])
            i += 1
    return res


def naive_bpe(lines, vocab_size):
    """Textbook BPE: recount every pair of every word occurrence after every merge. Slow but obvious."""
    words = [list(w.encode()) for line in lines for w in regex.findall(PAT_STR, line.lower())]
    ranks = {bytes([i]): i for i in range(256)}
    vocab = list(ranks)
    while len(vocab) < vocab_size:
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent; ties: smallest ids
        if counts[best] < 2:
            break
        new_id = ranks.setdefault(vocab[best[0]] + vocab[best[1]], len(vocab))
        if new_id == len(vocab):
            vocab.append(vocab[best[0]] + vocab[best[1]])
        words = [naive_merge(w, best, new_id) for w in words]
    return ranks


def test_pattern_is_tiktoken_cl100k():
    from tiktoken_ext import openai_public  # defines the loaders only; importing it downloads nothing
    assert PAT_STR in inspect.getsource(openai_public.cl100k_base)


def test_first_merge_is_most_frequent_pair():
    lines = corpus()
    counts = collections.Counter()
    for line in lines:
        for w in regex.findall(PAT_STR, line.lower()):
            counts.update(zip(w.encode(), w.encode()[1:]))
    (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
    ranks = train(lines, 257)
    assert len(ranks) == 257 and ranks[bytes([a, b])] == 256


def test_train_matches_naive_reference():
    lines = corpus()
    ranks = train(lines, 256 + 50)
    assert len(ranks) == 256 + 50 and ranks == naive_bpe(lines, 256 + 50)  # same tokens, same ranks


def test_trained_vocab_round_trips(tmp_path):
    lines = corpus()
    save(train(lines, 320), tmp_path / "v.tiktoken")
    tok = Tokenizer(str(tmp_path / "v.tiktoken"))
    assert tok.vocab_size == 322 and (tok.eot_id, tok.pad_id) == (320, 321)
    for text in lines[:20] + TEXTS:
        assert tok.decode(tok.encode(text)) == text.lower()
    assert len(tok.encode(lines[0])) < len(lines[0].encode())  # merges were learned and used


def test_train_rejects_bad_input():
    with pytest.raises(UserError, match="too small"):
        train(["a b c"], 100)
    with pytest.raises(UserError, match="empty"):
        train([], 300)


# ----------------------------------------------------------------------------- the file and the shipped vocab

def test_save_load_round_trip(tmp_path, monkeypatch):
    ranks = train(corpus(), 300)
    path = tmp_path / "sub" / "v.tiktoken"
    save(ranks, path)
    assert load(path) == ranks
    assert [p.name for p in path.parent.iterdir()] == ["v.tiktoken"]  # no temp file left behind
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reader, with its cache turned off
    assert load_tiktoken_bpe(str(path)) == ranks
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(UserError, match="not a .tiktoken file"):
        load(tmp_path / "bad.tiktoken")


def test_default_vocab_loads_offline(monkeypatch):
    no_network(monkeypatch)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("must not call tiktoken.get_encoding"))
    tok = Tokenizer()
    assert Path(DEFAULT_VOCAB).stat().st_size < 100_000
    assert (tok.name, tok.vocab_size, tok.eot_id, tok.pad_id) == ("default", 4098, 4096, 4097)
    words = ("red green blue yellow purple orange cyan pink white black gray grey circle square triangle "
             "star heart cross small large big tiny left right top bottom centre center middle above below")
    for w in words.split():
        assert len(tok.encode(" " + w)) == 1, w
    assert tok.decode(tok.encode("a small red circle at the top")) == "a small red circle at the top"
    assert len(tok.encode("A small red circle at the top")) == 7
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text.lower()


def test_named_encoding_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: tiktoken would have to download
    no_network(monkeypatch)
    t0 = time.time()
    with pytest.raises(UserError, match=r"'gpt2' \(no network\?\): pass --tokenizer PATH"):
        Tokenizer("gpt2")
    with pytest.raises(UserError, match="neither a file nor a tiktoken encoding"):
        Tokenizer("no_such_encoding")
    with pytest.raises(UserError, match="not found"):
        Tokenizer(str(tmp_path / "missing.tiktoken"))
    assert time.time() - t0 < 5


def test_named_encoding_keeps_its_endoftext(monkeypatch):
    # Stand in for a cached "gpt2": its own <|endoftext|> is kept, <|pad|> goes after the last id.
    ranks = train(corpus(), 300)
    fake = tiktoken.Encoding("gpt2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = Tokenizer("gpt2")
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (300, 301, 302)
    assert tok.state() == {"name": "gpt2", "tiktoken_encoding": "gpt2"}
    assert Tokenizer.from_state(tok.state()).encode("a red circle") == tok.encode("a red circle")


# ----------------------------------------------------------------------------- batches, lengths, state

def test_encode_batch_and_lengths(monkeypatch):
    tok = Tokenizer()
    monkeypatch.setattr(T, "_warned_truncation", False)
    long = "a small red circle at the top left of a big blue square"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = tok.encode_batch(["a red circle", "", long], length=8)
        tok.encode_batch([long, long], length=8)  # truncated again: no second warning
    assert len(caught) == 1 and "8" in str(caught[0].message) and "--text-len" in str(caught[0].message)
    assert x.shape == (3, 8) and x.dtype == torch.long
    ids = tok.encode("a red circle")
    assert x[0].tolist() == ids + [tok.eot_id] + [tok.pad_id] * (7 - len(ids))
    assert x[1].tolist() == [tok.eot_id] + [tok.pad_id] * 7
    assert x[2].tolist() == tok.encode(long)[:7] + [tok.eot_id]
    assert tok.lengths(x).tolist() == [len(ids), 0, 7]
    assert tok.decode(x[0]) == "a red circle"  # decode skips eot and pad
    no_eot = torch.full((1, 5), tok.pad_id)
    assert tok.lengths(no_eot).tolist() == [4]


def test_state_round_trip(tmp_path):
    path = tmp_path / "v.tiktoken"
    save(train(corpus(), 300), path)
    tok = Tokenizer(str(path))
    state = tok.state()
    assert len(json.dumps(state)) < 1_000_000
    path.unlink()  # the checkpoint alone must be enough
    again = Tokenizer.from_state(state)
    for attr in ("name", "vocab_size", "eot_id", "pad_id"):
        assert getattr(again, attr) == getattr(tok, attr)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


# ----------------------------------------------------------------------------- command line

def test_cli_train_folder_and_encode(tmp_path, capsys):
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    for i, caption in enumerate(corpus(60)):
        (images / f"{i}.txt").write_text(caption + "\n")
    out = tmp_path / "my.tiktoken"
    main(["--train", str(tmp_path / "images"), "--vocab-size", "300", "--out", str(out)])
    assert "trained" in capsys.readouterr().out and len(load(out)) == 300
    main(["--encode", "A Red Circle", "--vocab", str(out)])
    assert capsys.readouterr().out.splitlines()[-1].replace("|", "") == "a red circle"  # the pieces line


@pytest.mark.parametrize("args, message", [
    (["--train", "EMPTY", "--vocab-size", "1000"], "empty"),
    (["--train", "EMPTY", "--vocab-size", "100"], "too small"),
    (["--encode", "hi", "--vocab", "nowhere/v.tiktoken"], "not found"),
])
def test_cli_user_errors(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanodalle.tokenizer", "--train", str(tmp_path / "missing.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: caption file not found: {tmp_path / 'missing.txt'}"]
