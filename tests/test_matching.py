"""Direct embedding matching: pools, the embedding cache, the matcher learning a synthetic task,
training through the trainer and ``evaluate`` with a frozen embedder run, and bad input."""
import json
import os

import jax
import numpy as np
import pytest

from mixers_jax import matching, sharding, trainer
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from mixers_jax.steps import build_steps
from run_util import make_workdir
from tests_util import REPO


def _emb(n_train=40, n_held=20, d=8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(size=(n, d)).astype(np.float32) for k, n in
              (("train_q", n_train), ("train_p", n_train), ("held_q", n_held), ("held_p", n_held))}
    return matching.PairEmbeddings(arrays, "key")


def test_pools_hold_the_positive_once_at_the_target_among_distinct_candidates():
    rng = np.random.default_rng(0)
    rows = np.array([0, 5, 19, 7])
    cand, target = matching.draw_pools(rng, rows, 20, 6)
    for r, c, t in zip(rows, cand, target):
        assert c[t] == r and np.sum(c == r) == 1 and len(set(c)) == 6 and c.max() < 20
    emb = _emb()
    batches = matching.eval_batches(emb, 6, batch=8, max_queries=0, seed=3)
    assert [b["embeddings"].shape for b in batches] == [(8, 7, 8)] * 3
    assert [float(b["weight"].sum()) for b in batches] == [8, 8, 4]  # 20 held-out queries
    b = batches[1]
    for i in range(8):  # the query row, and the positive at the target
        np.testing.assert_array_equal(b["embeddings"][i, 0], emb.held_q[8 + i])
        np.testing.assert_array_equal(b["embeddings"][i, 1 + b["target"][i]], emb.held_p[8 + i])
    again = matching.eval_batches(emb, 6, batch=8, max_queries=0, seed=3)
    np.testing.assert_array_equal(again[2]["embeddings"], batches[2]["embeddings"])
    assert len(set(int(t) for b in batches for t in b["target"])) > 2  # random positions


def test_train_iterator_resumes_at_the_same_batch():
    it = matching.train_iterator(_emb(), 6, batch=4, seed=1)
    next(it)
    state = it.get_state()
    want = next(it)
    fresh = matching.train_iterator(_emb(), 6, batch=4, seed=1)
    fresh.set_state(state)
    got = next(fresh)
    np.testing.assert_array_equal(got["embeddings"], want["embeddings"])
    np.testing.assert_array_equal(got["target"], want["target"])


def test_cache_round_trip_and_key(tmp_path):
    emb, path = _emb(), str(tmp_path / "c.npz")
    matching.write_cache(path, emb)
    back = matching.read_cache(path, "key")
    np.testing.assert_array_equal(back.held_p, emb.held_p)
    assert matching.read_cache(path, "other key") is None
    assert matching.read_cache(str(tmp_path / "missing.npz"), "key") is None
    assert matching.pairs_digest([("a", "b")], []) != matching.pairs_digest([("ab", "")], [])


def test_check_pool_errors():
    with pytest.raises(UserError, match="larger than the held-out set"):
        matching.check_pool(32, 100, 20, 8)
    with pytest.raises(UserError, match="fewer than one batch of candidates"):
        matching.check_pool(8, 7, 20, 4)


def test_matcher_learns_to_find_the_noisy_copy_of_the_query():
    """Pools where the positive is the query plus noise: chance is 1/8; a few hundred steps of the
    matcher reach well above it (cosine similarity alone is the ceiling's reference)."""
    config = load_config(os.path.join(REPO, "configs/matcher.py") + ":smoke")
    config.unlock()
    config.model.update(d_model=16, n_layers=2)
    config.train.update(steps=300, lr=3e-3, warmup_steps=20, batch_size=32)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    steps = build_steps(config, mesh)
    state = steps.init(jax.random.key(0))
    rng = np.random.default_rng(0)

    def batch(n):
        q = rng.normal(size=(n, 16)).astype(np.float32)
        neg = rng.normal(size=(n, 8, 16)).astype(np.float32)
        t = rng.integers(0, 8, size=n)
        neg[np.arange(n), t] = q + 0.3 * rng.normal(size=(n, 16))
        return {"embeddings": np.concatenate([q[:, None], neg], 1), "target": t.astype(np.int32),
                "weight": np.ones(n, np.float32)}

    held = batch(256)
    before = steps.eval_step(state.params, held)
    for _ in range(300):
        state, stats = steps.train_step(state, batch(32))
    after = steps.eval_step(state.params, held)
    acc0, acc1 = (float(s["correct"] / s["tokens"]) for s in (before, after))
    assert acc0 < 0.4 and acc1 > 0.9, (acc0, acc1)
    assert float(after["nll"]) < 0.5 * float(before["nll"])


# ---------------------------------------------------------------- through the trainer and evaluate


@pytest.fixture(scope="module")
def embedder_run(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("matching") / "embedder"))  # d32, n_ctx 16


def _pairs_file(path, n=120):
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
             "rho sigma tau upsilon phi chi psi omega").split()
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            passage = " ".join(rng.choice(words, size=12)) + f" number {i}"
            f.write(json.dumps({"query": " ".join(passage.split()[:4]), "passage": passage}) + "\n")
    return str(path)


def _config(embedder, pairs, **train):
    config = load_config(os.path.join(REPO, "configs/matcher.py") + ":smoke")
    config.unlock()
    config.data.embedder = embedder
    config.retrieval.pairs = pairs
    config.retrieval.held_out_fraction = 0.25
    config.train.update(train)
    return config


def test_train_and_evaluate_a_matcher(tmp_path, embedder_run, capsys):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    workdir = str(tmp_path / "run")
    config = _config(embedder_run, pairs, steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    summary = trainer.run(config, workdir, build_data=matching.build_data)
    assert set(summary["evals"]) == {"match", "match_cosine"}
    ev = summary["evals"]["match"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["loss"] > 0 and ev["tokens"] > 0
    assert summary["data"]["pool"] == 8 and summary["data"]["embedding_cache_hit"] is False
    assert os.path.isfile(os.path.join(workdir, matching.CACHE_FILE))
    assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
    assert "match_cosine" in open(os.path.join(workdir, "log.txt")).read()
    # the cosine baseline needs no training: its numbers are the frozen embeddings' own
    from mixers_jax import evaluation

    result = evaluation.evaluate_run(workdir, max_rows=16)  # the trainer evaluated 2 batches of 8
    assert result["data"]["embedding_cache_hit"] is True and result["data"]["pool"] == 8
    assert result["objectives"]["match_cosine"]["accuracy"] == pytest.approx(
        summary["evals"]["match_cosine"]["accuracy"])
    assert result["objectives"]["match"]["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    assert "match_cosine" in evaluation.format_table(result)


@pytest.mark.parametrize("change, message", [
    (dict(embedder=""), "needs data.embedder"),
    (dict(d_model=16), "must equal the width of the embeddings"),
    (dict(n_ctx=41), "larger than the held-out set"),
])
def test_bad_matcher_input_is_one_error_nothing_written(tmp_path, embedder_run, change, message):
    config = _config(embedder_run, _pairs_file(tmp_path / "pairs.jsonl"))
    config.data.embedder = change.get("embedder", embedder_run)
    config.model.d_model = change.get("d_model", 32)
    config.model.n_ctx = change.get("n_ctx", 9)
    with pytest.raises(UserError, match=message):
        trainer.run(config, str(tmp_path / "run"), build_data=matching.build_data)
    assert not os.path.exists(tmp_path / "run" / matching.CACHE_FILE)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
