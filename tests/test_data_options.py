"""Published data conventions (split='first', pad packing truncates, pad = eos) and the full-row
copy evaluation (copy_full / blank_copy_full)."""
from __future__ import annotations

import json
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax import objectives
from mixers_jax.config import base_config
from mixers_jax.data import sources
from mixers_jax.data.pipeline import build_data, pack_rows, tokenize_documents
from mixers_jax.errors import UserError
from mixers_jax.evaluation import eval_rows
from mixers_jax.workdir import TOKENIZER_FILE

VOCAB = 384
_WORDS = ("the of and to in is was he that it for on with as his they at be this from have or by one "
          "had not but what all were when we there can an your which their said if do will each").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"document {i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 90)))
            for i in range(n)]


# ------------------------------------------------------------------------------- split='first'


def test_split_first_takes_the_first_documents_in_order():
    docs = _docs(30)
    train, test = sources.split_first(docs, 7)
    assert test == docs[:7] and train == docs[7:]
    assert not set(train) & set(test)
    data = base_config().data
    data.split, data.test_documents = "first", 7
    assert sources.split_for_config(docs, data) == (train, test)
    data.split = "hash"  # the default stays the hash split
    assert sources.split_for_config(docs, data) == sources.split_documents(docs, data.val_fraction)


@pytest.mark.parametrize("n, message", [
    (31, r"data.test_documents=31 is larger than the source \(30 documents\)"),
    (0, r"data.split='first' needs data.test_documents >= 1, got 0"),
])
def test_split_first_bad_sizes(n, message):
    with pytest.raises(UserError, match=message) as e:
        sources.split_first(_docs(30), n)
    assert "\n" not in str(e.value)


def test_unknown_split_is_refused():
    data = base_config().data
    data.split = "random"
    with pytest.raises(UserError, match="unknown data.split 'random'; choose one of: hash, first"):
        sources.split_for_config(_docs(3), data)


def _config(source: str, **data):
    c = base_config()
    c.data.source = source
    c.data.update(data)
    c.model.vocab_size = VOCAB
    c.model.n_ctx = 32
    c.train.batch_size = 4
    c.train.eval_batches = 2
    return c


def _corpus(tmp_path, docs) -> str:
    path = tmp_path / "data" / "corpus.jsonl"
    os.makedirs(path.parent)
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return str(path)


def test_build_data_first_split_holds_out_the_first_documents(tmp_path):
    docs = _docs(60, seed=1)
    src = _corpus(tmp_path, docs)
    bundle = build_data(_config(src, split="first", test_documents=10),
                        os.path.join(str(tmp_path / "wd"), TOKENIZER_FILE))
    s = bundle.stats
    assert (s["val_documents"], s["train_documents"]) == (10, 50)
    tok = bundle.tokenizer
    assert s["val_tokens"] == sum(len(d) for d in tokenize_documents(docs[:10], tok))
    assert s["train_tokens"] == sum(len(d) for d in tokenize_documents(docs[10:], tok))
    want = pack_rows(tokenize_documents(docs[:10], tok), n_ctx=32, packing="concat",
                     pad_id=tok.pad_id)
    got = np.concatenate([b["tokens"] for b in bundle.eval_batches])
    np.testing.assert_array_equal(got, want[: len(got)])

    # The evaluator reads the same held-out documents from the run's config.
    rows = eval_rows(_config(src, split="first", test_documents=10), tok).rows
    np.testing.assert_array_equal(rows, want)


def test_build_data_test_split_larger_than_source_writes_nothing(tmp_path):
    src = _corpus(tmp_path, _docs(20, seed=2))
    wd = tmp_path / "wd"
    with pytest.raises(UserError, match="data.test_documents=21 is larger than the source"):
        build_data(_config(src, split="first", test_documents=21),
                   os.path.join(str(wd), TOKENIZER_FILE))
    with pytest.raises(UserError, match=r"leaves no training documents \(test_documents=20\)"):
        build_data(_config(src, split="first", test_documents=20),
                   os.path.join(str(wd), TOKENIZER_FILE))
    assert not wd.exists()


# ------------------------------------------------------------------ pad packing and pad = eos


def test_pad_packing_is_one_document_per_row_truncated_to_its_first_tokens():
    pad = 2
    docs = [np.arange(10, 20, dtype=np.int32), np.arange(30, 33, dtype=np.int32),
            np.arange(40, 48, dtype=np.int32)]
    rows = pack_rows(docs, n_ctx=8, packing="pad", pad_id=pad)
    np.testing.assert_array_equal(rows, [
        list(range(10, 18)),  # truncated to its first 8 tokens; the rest is dropped
        [30, 31, 32, pad, pad, pad, pad, pad],
        list(range(40, 48)),  # exactly n_ctx: no pad, no EOS
    ])


def test_pad_is_eos(tmp_path):
    config = _config(_corpus(tmp_path, _docs(40, seed=3)), packing="pad", split="first",
                     test_documents=8)
    config.model.n_ctx = 512  # longer than every document
    bundle = build_data(config, os.path.join(str(tmp_path / "wd"), TOKENIZER_FILE))
    tok = bundle.tokenizer
    assert tok.pad_id == tok.eos_id == 2
    # Documents shorter than n_ctx are padded with that id, and those positions are never targets.
    batch = bundle.eval_batches[0]
    padded = batch["tokens"] == tok.eos_id
    assert padded.any()
    np.testing.assert_array_equal(batch["loss_mask"][padded], 0.0)


# ------------------------------------------------------------------ full-row copy evaluation

PAD, V = 2, 11


def _batch(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = (tokens != PAD).astype(jnp.float32)
    return {"tokens": tokens, "loss_mask": mask,
            "token_bytes": (1 + tokens % 3) * mask.astype(jnp.int32)}


def _hand_batch():
    """Rows of 2 chunks x 4 tokens: 0 and 3 full, 1 padded at the end (only the second chunk holds
    pads), 2 holding a pad in the first chunk (an EOS under concat packing)."""
    return np.array([
        [3, 4, 5, 6, 7, 8, 9, 10],
        [3, 4, 5, 6, 7, PAD, PAD, PAD],
        [3, PAD, 5, 6, 7, 8, 9, 10],
        [10, 9, 8, 7, 6, 5, 4, 3],
    ])


def test_full_row_filter_keeps_exactly_the_rows_without_pads():
    tokens = _hand_batch()
    np.testing.assert_array_equal(objectives.full_rows(jnp.asarray(tokens), PAD),
                                  [True, False, False, True])
    batch = _batch(tokens)
    kept = objectives.keep_full_rows(batch, PAD)
    np.testing.assert_array_equal(kept["tokens"], batch["tokens"])
    for key in ("loss_mask", "token_bytes"):
        got, was = np.asarray(kept[key]), np.asarray(batch[key])
        assert was[[1, 2]].any()  # the padded rows had real targets before the filter
        np.testing.assert_array_equal(got[[0, 3]], was[[0, 3]])
        np.testing.assert_array_equal(got[[1, 2]], 0)


def _ctx(kind: str):
    cfg = base_config()
    cfg.model.update({"kind": kind, "vocab_size": V, "n_ctx": 4 if kind == "memory" else 8,
                      "chunks": 2})
    return objectives.ObjectiveContext(model=cfg.model, train=cfg.train, pad_id=PAD)


@pytest.mark.parametrize("kind", ["memory", "mixer"])
@pytest.mark.parametrize("name", ["copy", "blank_copy"])
def test_full_row_copy_equals_copy_on_the_full_rows_alone(kind, name):
    tokens = _hand_batch()
    table = jnp.asarray(np.random.default_rng(0).normal(size=(V, V)), jnp.float32)

    def apply(params, t):  # logits depend on each row's own tokens only
        return table[t] + jnp.cumsum(table[t], axis=1) * 0.1

    ctx = _ctx(kind)
    full_loss, full = objectives.build(name + "_full", ctx)(apply, None, _batch(tokens))
    ref_loss, ref = objectives.build(name, ctx)(apply, None, _batch(tokens[[0, 3]]))
    assert float(full["tokens"]) == float(ref["tokens"]) > 0
    for key in ("nll", "correct", "bytes"):
        assert float(full[key]) == pytest.approx(float(ref[key]), rel=1e-6)
    assert float(full_loss) == pytest.approx(float(ref_loss), rel=1e-6)
    # The unfiltered figure counts the padded rows' real tokens too.
    _, every = objectives.build(name, ctx)(apply, None, _batch(tokens))
    assert float(every["tokens"]) > float(full["tokens"])

