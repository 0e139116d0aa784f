"""Data layer: sources, split, tokenizer exactness, packing, per-host slicing, resume, build_data."""
from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import pytest

from mixers_jax.config import base_config
from mixers_jax.data import embedded, sources
from mixers_jax.data.pipeline import (
    build_data,
    count_windows,
    get_iterator_state,
    make_eval_batches,
    make_train_iterator,
    pack_rows,
    set_iterator_state,
    tokenize_documents,
)
from mixers_jax.data.embedded import embedded_corpus
from mixers_jax.data.sources import load_documents, split_documents
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.errors import UserError
from mixers_jax.workdir import TOKENIZER_FILE

VOCAB = 384

_WORDS = (
    "the of and to in is was he that it for on with as his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know Haus Straße über schön Grüße café "
    "naïve déjà vu garçon мир привет книга日本語 東京 こんにちは 中文 한국어 año niño"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ",", ";"])


def _docs(n: int, seed: int = 0, sentences: tuple[int, int] = (3, 12)) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = [
            " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
            for _ in range(rng.randint(*sentences))
        ]
        out.append(f"Document {i}.\n" + "\n".join(lines))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "t.model")
    return Tokenizer.train(_docs(150), VOCAB, path, max_chars=1_000_000)


def _cfg(**data):
    c = base_config()
    for k, v in data.items():
        c.data[k] = v
    return c.data


def _write(path, text: str | bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode, **({} if isinstance(text, bytes) else {"encoding": "utf-8"})) as f:
        f.write(text)
    return str(path)


def _write_parquet(path, column: str, values) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: values, "id": list(range(len(values)))}), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------
# Sources


def test_text_file_small_is_one_document_large_is_chunked(tmp_path):
    small = _write(tmp_path / "small.txt", "Hello there.\n\nSecond paragraph.\n")
    assert load_documents(_cfg(source=small)) == ["Hello there.\n\nSecond paragraph.\n"]

    rng = random.Random(1)
    paras = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    text = "\n\n".join(paras)
    big = _write(tmp_path / "big.txt", text)
    docs = load_documents(_cfg(source=big))
    assert len(docs) > 5
    assert all(len(d) <= 8192 for d in docs) and all(len(d) >= 2048 for d in docs[:-1])
    assert "\n\n".join(docs) == text  # cuts fall on blank lines, nothing else changes

    # A single huge line (no paragraphs) is still cut.
    line = _write(tmp_path / "line.txt", " ".join(["word"] * 10_000))
    docs = load_documents(_cfg(source=line))
    assert len(docs) > 1 and "".join(docs) == " ".join(["word"] * 10_000)


def test_folder_glob_and_comma_list(tmp_path):
    d = tmp_path / "corpus"
    _write(d / "b.txt", "bee")
    _write(d / "a.md", "ay")
    _write(d / "sub" / "c.txt", "sea")
    _write(d / "sub" / "d.jsonl", json.dumps({"text": "dee"}) + "\n")
    _write_parquet(d / "sub" / "e.parquet", "text", ["ee", None, ""])
    _write(d / "ignored.csv", "no")
    _write(d / ".hidden.txt", "no")
    _write(d / "empty.txt", "  \n\n ")
    assert load_documents(_cfg(source=str(d))) == ["ay", "bee", "sea", "dee", "ee"]
    assert load_documents(_cfg(source=str(d), format="text")) == ["ay", "bee", "sea"]
    assert load_documents(_cfg(source=str(d / "*.txt"))) == ["bee"]
    assert load_documents(_cfg(source=str(d / "**" / "*.txt"))) == ["bee", "sea"]
    both = f"{d / 'sub' / 'c.txt'}, {d / 'b.txt'}"
    assert load_documents(_cfg(source=both)) == ["sea", "bee"]  # entries in the order given
    assert load_documents(_cfg(source=str(d), max_documents=2)) == ["ay", "bee"]


def test_jsonl_field_and_errors(tmp_path):
    lines = [json.dumps({"content": "first doc", "x": 1}), "", json.dumps({"content": ""}),
             json.dumps({"content": "ünïcödé 日本"})]  # fmt: skip
    p = _write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    assert load_documents(_cfg(source=p, text_field="content")) == ["first doc", "ünïcödé 日本"]
    with pytest.raises(UserError, match=r"a\.jsonl:1: no field 'text'"):
        load_documents(_cfg(source=p))
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_documents(_cfg(source=bad))
    arr = _write(tmp_path / "arr.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    assert load_documents(_cfg(source=arr)) == ["one", "two"]


def test_parquet_column_and_error(tmp_path):
    p = _write_parquet(tmp_path / "train-0000.parquet", "body", ["alpha beta", "gamma", None])
    assert load_documents(_cfg(source=p, text_field="body")) == ["alpha beta", "gamma"]
    with pytest.raises(UserError, match=r"no column 'text'.*body"):
        load_documents(_cfg(source=p))


def test_source_errors_and_non_utf8(tmp_path):
    with pytest.raises(UserError, match="no data found at .*missing.txt"):
        load_documents(_cfg(source=str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match="no data found at .*glob matches nothing"):
        load_documents(_cfg(source=str(tmp_path / "*.nothing")))
    empty = _write(tmp_path / "empty" / "e.txt", "\n  \n")
    with pytest.raises(UserError, match="data at .* is empty"):
        load_documents(_cfg(source=empty))
    with pytest.raises(UserError, match=r"no data found at .*empty \(no \*\.parquet files\)"):
        load_documents(_cfg(source=str(tmp_path / "empty"), format="parquet"))
    with pytest.raises(UserError, match="unknown data format"):
        load_documents(_cfg(source=empty, format="csv"))
    latin = _write(tmp_path / "latin1.txt", b"caf\xe9 ok\n")
    assert load_documents(_cfg(source=latin)) == ["caf\ufffd ok\n"]


def test_replaced_bytes_are_counted_like_errors_replace(tmp_path):
    rng = random.Random(3)
    for _ in range(200):
        blob = bytes(rng.choice(b"ab\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xff\x80\xed\xa0") for _ in range(rng.randint(0, 40)))
        text, replaced = sources.decode_utf8(blob)
        assert text == blob.decode("utf-8", errors="replace")
        assert replaced == len(blob) - len(text.replace("\ufffd", "").encode("utf-8"))
    # two stray Latin-1 bytes in 1 KB of text: kept (U+FFFD) and counted in the statistics
    body = ("plain English prose. " * 50).encode() + b"caf\xe9 na\xefve\n"
    latin = _write(tmp_path / "stray.txt", body)
    jl = _write(tmp_path / "x.jsonl", b'{"text": "d\xe9j\xe0 vu"}\n{"text": "fine"}\n')
    pq = _write_parquet(tmp_path / "x.parquet", "text", [b"ol\xe9", b"ok"])
    docs, stats = sources.read_documents(_cfg(source=f"{latin},{jl},{pq}"))
    assert docs[-4:] == ["d\ufffdj\ufffd vu", "fine", "ol\ufffd", "ok"] and "caf\ufffd na\ufffdve" in docs[0]
    assert stats.as_dict() == {"source_files": 3, "replaced_bytes": 5}
    assert sources.read_documents(_cfg(source=_write(tmp_path / "ok.txt", "fine")))[1].replaced_bytes == 0


def test_binary_files_are_refused_in_one_line(tmp_path):
    exe = _write(tmp_path / "prog", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"prog looks binary \(a NUL byte at offset 7\)") as info:
        load_documents(_cfg(source=exe))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="looks binary"):
        load_documents(_cfg(source=sys.executable))  # the advice's case: a real executable
    # No NUL, but mostly invalid UTF-8 (compressed or encrypted data, a non-UTF-8 encoding).
    noise = bytes(random.Random(0).randrange(1, 256) for _ in range(4000))
    blob = _write(tmp_path / "noise.txt", noise)
    with pytest.raises(UserError, match=r"noise\.txt looks binary or is not UTF-8 \(\d+ of 4000 bytes"):
        load_documents(_cfg(source=blob))
    latin = _write(tmp_path / "fr.txt", ("d\xe9j\xe0 \xe9t\xe9 " * 20).encode("latin-1"))
    with pytest.raises(UserError, match=r"fr\.txt looks binary or is not UTF-8 \(80 of 180 bytes.*iconv"):
        load_documents(_cfg(source=latin))
    jl = _write(tmp_path / "bin.jsonl", b'{"text": "a"}\n\x00\x01\x02\n')
    with pytest.raises(UserError, match=r"bin\.jsonl looks binary \(a NUL byte at offset 14\)"):
        load_documents(_cfg(source=jl))
    # the threshold: at most 1% (or fewer than 8 bytes) passes
    edge = _write(tmp_path / "edge.txt", b"x" * 792 + b"\xff" * 8)  # 8 of 800 = 1%
    assert sources.read_documents(_cfg(source=edge))[1].replaced_bytes == 8
    over = _write(tmp_path / "over.txt", b"x" * 791 + b"\xff" * 9)
    with pytest.raises(UserError, match="9 of 800 bytes"):
        load_documents(_cfg(source=over))


def test_split_is_deterministic_disjoint_and_ordered():
    docs = [f"document number {i}" for i in range(2000)]
    train, val = split_documents(docs, 0.1)
    assert (train, val) == split_documents(list(docs), 0.1)
    assert not set(train) & set(val) and len(train) + len(val) == len(docs)
    assert 120 < len(val) < 280
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    # Growing the corpus never moves an existing document across the split.
    train2, val2 = split_documents(docs + [f"more {i}" for i in range(100)], 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    # Tiny corpora still get a validation document; val_fraction 0 gives none.
    t, v = split_documents(["a", "b"], 0.01)
    assert len(v) == 1 and len(t) == 1
    assert split_documents(["a", "b", "c"], 0.0) == (["a", "b", "c"], [])
    with pytest.raises(UserError, match="val_fraction"):
        split_documents(docs, 1.5)


def test_embedded_corpus_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_memo", {})
    docs = embedded_corpus()
    text = "\n".join(docs)
    assert len(text.encode()) > 1_000_000 and len(docs) > 200
    for word in (" the ", " return ", " function ", " and ", " of "):
        assert word in text
    (cache,) = os.listdir(tmp_path / "cache")
    assert cache.startswith("embedded_corpus-")
    embedded._memo.clear()
    assert embedded_corpus() == docs  # read back from the cache
    assert load_documents(_cfg(source="embedded", max_documents=5)) == docs[:5]
    path = tmp_path / "cache" / cache
    path.write_bytes(path.read_bytes()[:-100])  # corrupt: rebuilt, never trusted
    embedded._memo.clear()
    monkeypatch.setattr(embedded, "build_embedded_corpus", lambda: ["rebuilt"])
    assert embedded_corpus() == ["rebuilt"]
    embedded._memo.clear()
    assert embedded_corpus() == ["rebuilt"]  # and the cache was rewritten


# ------------------------------------------------------------------------------------------------
# Tokenizer

NASTY = [
    "", " ", "   ", "\t", "a\tb", "  leading", "trailing  ", "  both  ", "x\r\ny\r\n", "\n\n\n",
    "\x00\x01\x02\x1f\x7f", "control\x0bchars\x0c", "日本語のテキスト", "中文 한국어",
    "😀", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "e\u0301 n\u0303 a\u0308\u0301", "Straße",
    "literal \u2581 meta", "\u2581", "\u2581\u2581 \u2581", "</s><s><unk> <0x41>", "\ufeffbom",
    "\u00a0nbsp\u3000ideographic\u200bzwsp", "\U0010ffff\ufffe\uffff", "tab\t\t  spaces    end",
    "123456789 3.14159", "mixed ▁ and _ and \u2582",
]  # fmt: skip


def _random_text(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.3:
            out.append(chr(rng.randint(0, 127)))
        elif r < 0.45:
            out.append(chr(rng.randint(0x80, 0x7FF)))
        elif r < 0.6:
            c = rng.randint(0x800, 0xFFFF)
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else "\u2581")
        elif r < 0.7:
            out.append(chr(rng.randint(0x10000, 0x10FFFF)))
        elif r < 0.85:
            out.append(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\u2581", "\u200d", "\u0301"]))
        else:
            out.append(rng.choice(_WORDS))
    return "".join(out)


def test_tokenizer_round_trip_and_bytes_exact(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert tok.vocab_size == VOCAB and tok.pad_id == tok.eos_id == 2 and tok.exact
    assert tb[tok.eos_id] == 0 and tb[tok.unk_id] == 0
    rng = random.Random(1234)
    strings = NASTY + [_random_text(rng) for _ in range(1500)] + _docs(5, seed=9)
    for s in strings:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
        assert int(tb[ids].sum()) == len(s.encode("utf-8")), repr(s)
        assert tok.eos_id not in ids and tok.unk_id not in ids
    assert tok.encode_batch(strings[:200]) == [tok.encode(s) for s in strings[:200]]
    assert tok.decode([tok.eos_id]) == ""
    with pytest.raises(UserError, match="surrogate"):
        tok.encode("bad \ud800 text")


def test_tokenizer_serialize_load_and_determinism(tok, tmp_path):
    again = Tokenizer.from_serialized(tok.serialized())
    assert again.encode("Grüße aus 東京") == tok.encode("Grüße aus 東京")
    assert np.array_equal(again.token_bytes(), tok.token_bytes())
    path = str(tmp_path / "sub" / "m.model")
    retrained = Tokenizer.train(_docs(150), VOCAB, path, max_chars=1_000_000)
    assert retrained.serialized() == tok.serialized()  # deterministic
    assert Tokenizer.load(path).serialized() == tok.serialized()
    assert os.listdir(tmp_path / "sub") == ["m.model"]  # no temp files left behind
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(str(tmp_path / "nope.model"))
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer.from_serialized(b"garbage")


def test_tokenizer_small_vocab_lowers_character_coverage():
    docs = _docs(40, seed=3)
    small = Tokenizer.train(docs, 345, max_chars=1_000_000)  # fewer slots than distinct characters
    assert small.vocab_size == 345
    tb = small.token_bytes()
    for s in docs[:5] + NASTY:
        ids = small.encode(s)
        assert small.decode(ids) == s and int(tb[ids].sum()) == len(s.encode("utf-8"))


def test_tokenizer_training_errors():
    with pytest.raises(UserError, match="vocab_size 200 is too small"):
        Tokenizer.train(_docs(5), 200)
    with pytest.raises(UserError, match="vocab_size 262 is too small for this corpus"):
        Tokenizer.train(_docs(40, seed=3), 262)
    with pytest.raises(UserError, match="corpus too small for vocab_size 5000"):
        Tokenizer.train(_docs(5), 5000)
    with pytest.raises(UserError, match="no text"):
        Tokenizer.train(["\n\n"], 300)


# ------------------------------------------------------------------------------------------------
# Packing, batches, slicing, resume


def _toy_docs():
    return [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 1, 12, 7, 30, 3)]


def test_concat_packing():
    docs = _toy_docs()
    pad, table = 2, np.arange(100, dtype=np.int32) % 4
    stream = np.concatenate([np.concatenate([d, [pad]]) for d in docs])
    rows = pack_rows(docs, n_ctx=8, packing="concat", pad_id=pad)
    assert rows.shape == (len(stream) // 8, 8) == (count_windows(docs, n_ctx=8, packing="concat"), 8)
    assert np.array_equal(rows.reshape(-1), stream[: rows.size])
    (batch,) = make_eval_batches(docs, n_ctx=8, batch_size=8, packing="concat", pad_id=pad,
                                 token_bytes=table, max_batches=0)  # fmt: skip
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((8, 8), np.int32), "loss_mask": ((8, 8), np.float32), "token_bytes": ((8, 8), np.int32)
    }  # fmt: skip
    assert np.array_equal(batch["loss_mask"], (rows != pad).astype(np.float32))
    assert np.array_equal(batch["token_bytes"], np.where(rows != pad, table[rows], 0))


def test_pad_packing():
    docs = _toy_docs()
    rows = pack_rows(docs, n_ctx=8, packing="pad", pad_id=2)
    assert rows.shape == (6, 8)
    assert np.array_equal(rows[0], [10, 11, 12, 13, 14, 2, 2, 2])
    assert np.array_equal(rows[2], np.arange(10, 18))  # truncated
    (b,) = make_eval_batches(docs, n_ctx=8, batch_size=6, packing="pad", pad_id=2,
                             token_bytes=np.ones(64, np.int32), max_batches=0)  # fmt: skip
    assert np.array_equal(b["loss_mask"].sum(1), [5, 1, 8, 7, 8, 3])
    assert np.array_equal(b["token_bytes"], b["loss_mask"].astype(np.int32))
    with pytest.raises(UserError, match="unknown packing"):
        pack_rows(docs, n_ctx=8, packing="ragged", pad_id=2)


def test_bits_per_byte_denominator_is_exact(tok):
    texts = ["Hello wörld 😀", "  two\tspaces  ", "日本語", "\u2581x\r\n"]
    token_docs = tokenize_documents(texts, tok)
    (b,) = make_eval_batches(token_docs, n_ctx=64, batch_size=4, packing="pad", pad_id=tok.pad_id,
                             token_bytes=tok.token_bytes(), max_batches=0)  # fmt: skip
    for row, text in zip(range(4), texts):
        assert int(b["token_bytes"][row].sum()) == len(text.encode("utf-8"))
        n = int(b["loss_mask"][row].sum())
        assert tok.decode(b["tokens"][row, :n]) == text


def test_per_host_slices_are_disjoint_and_covering():
    lengths = list(range(3, 40))
    starts = np.cumsum([0] + lengths) + 3
    docs = [np.arange(a, a + n, dtype=np.int32) for a, n in zip(starts, lengths)]  # all rows distinct
    rows = pack_rows(docs, n_ctx=4, packing="concat", pad_id=2)
    P, B = 3, 4
    kw = dict(n_ctx=4, batch_size=B, packing="concat", pad_id=2, token_bytes=np.ones(2000, np.int32))
    assert len({tuple(r) for r in rows}) == len(rows) > 100
    per_host = len(rows) // P
    ev = [
        make_eval_batches(docs, max_batches=0, process_index=p, process_count=P, **kw)
        for p in range(P)
    ]
    assert len({len(e) for e in ev}) == 1 and len(ev[0]) == per_host // B
    # The training iterator's first epoch on each host is a permutation of that host's rows.
    seen = []
    for p in range(P):
        it = make_train_iterator(docs, seed=7, process_index=p, process_count=P, **kw)
        epoch = np.concatenate([next(it)["tokens"] for _ in range(per_host // B)])
        host_rows = rows[: per_host * P][p::P]
        assert len(epoch) == (per_host // B) * B
        got = set(map(tuple, epoch))
        assert len(got) == len(epoch) and got <= set(map(tuple, host_rows))
        seen.append(host_rows)
    all_rows = np.concatenate(seen)
    assert len(all_rows) == per_host * P
    order = sorted(range(per_host * P), key=lambda i: (i % P, i // P))
    assert np.array_equal(all_rows, rows[: per_host * P][order])  # disjoint, and together all rows


def test_train_iterator_epochs_and_resume_bit_identical():
    docs = [np.arange(n, dtype=np.int32) % 50 + 3 for n in range(5, 60)]
    kw = dict(n_ctx=16, batch_size=4, packing="concat", seed=3, pad_id=2,
              token_bytes=np.ones(64, np.int32))  # fmt: skip
    rows = pack_rows(docs, n_ctx=16, packing="concat", pad_id=2)
    n = len(rows)
    it = make_train_iterator(docs, **kw)
    first = [next(it) for _ in range(2 * n // 4 + 3)]
    flat = np.concatenate([b["tokens"] for b in first])
    e0, e1 = flat[:n], flat[n : 2 * n]
    assert sorted(map(tuple, e0)) == sorted(map(tuple, rows)) == sorted(map(tuple, e1))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, rows)  # reshuffled each epoch

    it = make_train_iterator(docs, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(get_iterator_state(it)))
    rest = [next(it) for _ in range(7)]
    fresh = make_train_iterator(docs, **kw)
    set_iterator_state(fresh, state)
    for a, b in zip(rest, (next(fresh) for _ in range(7))):
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    for a, b in zip(first[5:12], rest):
        assert np.array_equal(a["tokens"], b["tokens"])
    other_seed = make_train_iterator(docs, **{**kw, "seed": 4})
    assert not np.array_equal(next(other_seed)["tokens"], first[0]["tokens"])


def test_too_small_errors():
    docs = [np.arange(3, 40, dtype=np.int32)]
    kw = dict(packing="concat", pad_id=2, token_bytes=np.ones(64, np.int32))
    with pytest.raises(UserError, match=r"corpus too small: the train split's 37 tokens .* give 2 windows "
                                        r"of n_ctx=16.*need at least 4"):  # fmt: skip
        make_train_iterator(docs, n_ctx=16, batch_size=4, seed=0, **kw)
    with pytest.raises(UserError, match="validation split.*data.val_fraction"):
        make_eval_batches(docs, n_ctx=64, batch_size=1, max_batches=0, **kw)


# ------------------------------------------------------------------------------------------------
# build_data


def _config(source: str, **over):
    c = base_config()
    c.data.source = source
    c.data.val_fraction = 0.2
    c.model.vocab_size = VOCAB
    c.model.n_ctx = 32
    c.train.batch_size = 4
    c.train.eval_batches = 2
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _tokenizer_path(workdir) -> str:
    return os.path.join(workdir, TOKENIZER_FILE)


def _corpus(tmp_path, n=120) -> str:
    lines = [json.dumps({"text": d}) for d in _docs(n, seed=5)]
    return _write(tmp_path / "data" / "corpus.jsonl", "\n".join(lines))


def test_build_data_trains_saves_and_reloads(tmp_path):
    src = _corpus(tmp_path)
    wd = str(tmp_path / "wd")
    bundle = build_data(_config(src), _tokenizer_path(wd))
    assert bundle.tokenizer_trained and os.listdir(wd) == ["tokenizer.model"]
    s = bundle.stats
    assert s["documents"] == 120 and s["train_documents"] + s["val_documents"] == 120
    assert s["train_tokens"] > 0 and s["val_tokens"] > 0 and s["train_bytes"] > s["train_tokens"]
    assert len(bundle.eval_batches) == 2
    batch = next(bundle.train_iter)
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].max() < VOCAB
    # Second run: the saved tokenizer is loaded, batches are the same.
    again = build_data(_config(src), _tokenizer_path(wd))
    assert not again.tokenizer_trained and again.tokenizer.serialized() == bundle.tokenizer.serialized()
    assert np.array_equal(next(again.train_iter)["tokens"], batch["tokens"])
    # A tokenizer path outside any workdir.
    explicit = str(tmp_path / "elsewhere" / "tok.model")
    by_path = build_data(_config(src), explicit)
    assert by_path.tokenizer_trained and by_path.tokenizer_path == explicit
    assert Tokenizer.load(explicit).serialized() == bundle.tokenizer.serialized()
    # Two processes: half the batch each.
    half = build_data(_config(src), _tokenizer_path(wd), process_index=1, process_count=2)
    assert next(half.train_iter)["tokens"].shape == (2, 32)
    with pytest.raises(UserError, match="vocab_size is 400"):
        build_data(_config(src, **{"model.vocab_size": 400}), _tokenizer_path(wd))
    with pytest.raises(UserError, match="tokenizer model .*missing.model does not exist"):
        build_data(_config(src, **{"data.tokenizer_model": str(tmp_path / "missing.model")}),
                   _tokenizer_path(wd))


def test_build_data_bad_input_leaves_workdir_untouched(tmp_path):
    src = _corpus(tmp_path, n=30)
    wd = tmp_path / "wd"
    with pytest.raises(UserError, match="corpus too small: the train split"):
        build_data(_config(src, **{"model.n_ctx": 4096}), _tokenizer_path(str(wd)))
    with pytest.raises(UserError, match="validation split"):
        build_data(_config(src, **{"train.batch_size": 16, "data.packing": "pad"}),
                   _tokenizer_path(str(wd)))
    with pytest.raises(UserError, match="no data found"):
        build_data(_config(str(tmp_path / "nothing.txt")), _tokenizer_path(str(wd)))
    with pytest.raises(UserError, match="multiple of the process count"):
        build_data(_config(src, **{"train.batch_size": 5}), _tokenizer_path(str(wd)),
                   process_count=2)
    assert not wd.exists()
