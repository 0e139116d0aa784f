"""The search index library with a deterministic stand-in embedder (no model): corpus scanning,
build, fingerprints, rebuild detection, search round trips and bad inputs."""
import json
import os
import zlib

import numpy as np
import pytest

from mixers_jax import search_index
from mixers_jax.data import passages
from mixers_jax.errors import UserError

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "The five boxing wizards jump quickly.",
]


class TrigramEmbedder:
    """Hashed character-trigram counts: equal texts embed equally, different ones differently."""

    def __init__(self, tag: str = "a", dim: int = 64):
        self.fingerprint = zlib.crc32(tag.encode()).to_bytes(4, "big").hex() * 8
        self.description = {"workdir": f"/runs/{tag}", "step": 1}
        self.dim, self.calls = dim, []
        self.seed = zlib.crc32(tag.encode())

    def embed_texts(self, texts):
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            for i in range(len(t) - 2):
                out[r, zlib.crc32(t[i:i + 3].encode(), self.seed) % self.dim] += 1.0
        return out


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _text_corpus(tmp_path) -> str:
    return _write(tmp_path / "corpus.txt", ("\n\n  \n".join(PARAGRAPHS) + "\n").encode())


def test_scan_text_spans_give_back_each_paragraph(tmp_path):
    path = _text_corpus(tmp_path)
    data = open(path, "rb").read()
    scan = passages.scan(path, data, "text")
    assert len(scan.spans) == len(PARAGRAPHS)
    got = [passages.passage_text(data, int(s), int(n), "text") for s, n in scan.spans]
    assert got == PARAGRAPHS
    lines = passages.scan(path, data, "text", split="line")
    assert len(lines.spans) == len(PARAGRAPHS)  # the blank lines are not passages


def test_round_trip_text_corpus_finds_the_exact_passage(tmp_path):
    path, folder = _text_corpus(tmp_path), str(tmp_path / "idx")
    emb = TrigramEmbedder()
    meta = search_index.build(folder, emb, search_index.CorpusSpec(path), batch_size=2,
                              progress=lambda *a: None)
    assert meta["action"] == "built" and meta["passages"] == 5 and emb.calls == [2, 2, 1]
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "idx"]  # no temporary folder left
    index = search_index.open_index(folder, emb)
    assert isinstance(index.embeddings, np.memmap)
    for i, p in enumerate(PARAGRAPHS):
        (best, *rest), = index.search(emb, [p], k=3)
        assert (best.passage, best.text, best.rank) == (i, p, 1)
        assert best.score == pytest.approx(1.0, abs=1e-5)
        assert all(h.score <= best.score for h in rest) and [h.rank for h in rest] == [2, 3]


def test_round_trip_jsonl_with_field_and_non_utf8_skipped(tmp_path):
    lines = [json.dumps({"id": i, "body": p}).encode() for i, p in enumerate(PARAGRAPHS)]
    lines.insert(2, b'{"id": 9, "body": "caf\xe9 latin-1"}')  # not UTF-8: skipped, counted
    lines.insert(4, b'{"id": 10, "body": ""}')  # empty: skipped, counted
    path = _write(tmp_path / "c.jsonl", b"\n".join(lines) + b"\n\n")
    emb = TrigramEmbedder()
    meta = search_index.build(str(tmp_path / "idx"), emb,
                              search_index.CorpusSpec(path, text_field="body"),
                              progress=lambda *a: None)
    assert (meta["passages"], meta["skipped_non_utf8"], meta["skipped_empty"]) == (5, 1, 1)
    index = search_index.open_index(str(tmp_path / "idx"), emb)
    hits = index.search(emb, PARAGRAPHS[3:4], k=1)
    assert hits[0][0].text == PARAGRAPHS[3]


def test_fingerprint_up_to_date_and_rebuild_on_model_or_corpus_change(tmp_path):
    path, folder = _text_corpus(tmp_path), str(tmp_path / "idx")
    spec = search_index.CorpusSpec(path)
    quiet = dict(progress=lambda *a: None)
    search_index.build(folder, TrigramEmbedder("a"), spec, **quiet)
    again = TrigramEmbedder("a")
    assert search_index.build(folder, again, spec, **quiet)["action"] == "up_to_date"
    assert again.calls == []  # nothing embedded
    other = TrigramEmbedder("b")
    rebuilt = search_index.build(folder, other, spec, **quiet)
    assert rebuilt["action"] == "rebuilt" and "the model changed" in rebuilt["changes"][0]
    assert search_index.open_index(folder, other).meta["model"]["fingerprint"] == other.fingerprint
    _write(path, ("\n\n".join(PARAGRAPHS[:3]) + "\n").encode())
    changed = search_index.build(folder, other, spec, **quiet)
    assert changed["action"] == "rebuilt" and "the corpus changed" in changed["changes"][0]
    assert changed["passages"] == 3


def test_index_of_another_model_or_changed_corpus_is_refused(tmp_path):
    path, folder = _text_corpus(tmp_path), str(tmp_path / "idx")
    search_index.build(folder, TrigramEmbedder("a"), search_index.CorpusSpec(path),
                       progress=lambda *a: None)
    with pytest.raises(UserError, match="built by another model"):
        search_index.open_index(folder, TrigramEmbedder("b"))
    _write(path, b"something else entirely\n")
    with pytest.raises(UserError, match="changed since"):
        search_index.open_index(folder, TrigramEmbedder("a"))


@pytest.mark.parametrize("content, fmt, message", [
    (b'{"text": "a"}\n{"body": "b"}\n', "jsonl", r"c:2: no field 'text'"),
    (b'{"text": "a"}\nnot json\n', "jsonl", "c:2: not valid JSON"),
    (b'{"text": 3}\n', "jsonl", "is a int, not a string"),
    (b"", "text", "has no passages"),
    (b"\n\n  \n", "text", "has no passages"),
    (b"\xff\xfe bad\n\n\xc3\x28\n", "text", r"has no passages \(2 skipped as non-UTF-8"),
])
def test_bad_corpus_is_one_error_and_writes_nothing(tmp_path, content, fmt, message):
    path = _write(tmp_path / "c", content)
    with pytest.raises(UserError, match=message):
        search_index.build(str(tmp_path / "idx"), TrigramEmbedder(),
                           search_index.CorpusSpec(path, fmt), progress=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_a_folder_that_is_not_an_index_is_never_overwritten(tmp_path):
    path = _text_corpus(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a search index"):
        search_index.build(str(folder), TrigramEmbedder(), search_index.CorpusSpec(path))
    with pytest.raises(UserError, match="is not a search index"):
        search_index.open_index(str(folder))
    assert os.listdir(folder) == ["notes.txt"]


def test_top_k_merges_blocks_exactly(tmp_path, monkeypatch):
    """Scoring in blocks of rows gives the same top-k as scoring all rows at once."""
    rng = np.random.default_rng(0)
    emb = search_index.unit_rows(rng.normal(size=(50, 8)))
    q = rng.normal(size=(3, 8)).astype(np.float32)
    index = search_index.Index("x", {}, emb, np.zeros((50, 2), np.int64), b"")
    monkeypatch.setattr(search_index, "SCORE_ROWS", 7)
    scores, rows = index.top_k(q, 4)
    full = search_index.unit_rows(q) @ emb.T
    want = np.argsort(-full, axis=1)[:, :4]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), rtol=1e-6)
