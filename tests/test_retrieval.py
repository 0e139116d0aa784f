"""Retrieval: the InfoNCE loss, learning a synthetic span task, pair data, pools, BM25, bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixers_jax import objectives, ranking
from mixers_jax import trainer as trainer_lib
from mixers_jax.config import base_config, load_config
from mixers_jax.data import pairs as pairs_lib
from mixers_jax.data.pipeline import pad_rows
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.models.embedding import cosine_matrix, embed_rows
from tests_util import config_path


# --------------------------------------------------------------------------- the loss


def test_info_nce_matches_a_hand_computation():
    sim = np.array([[0.9, 0.1, -0.3, 0.5],
                    [0.2, 0.8, 0.7, 0.0],
                    [0.4, 0.4, 0.1, 0.6]], np.float32)
    positive = np.array([3, 1, 0])  # the positive is not always on the diagonal
    for tau in (0.02, 0.5):
        loss, hit = objectives.info_nce(jnp.asarray(sim), jnp.asarray(positive), tau)
        for q in range(3):
            e = np.exp(sim[q].astype(np.float64) / tau)
            want = -np.log(e[positive[q]] / e.sum())
            assert float(loss[q]) == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert hit.tolist() == [0.0, 1.0, 0.0]
    # moving the positive to another candidate changes the loss as the hand formula says
    loss_a, _ = objectives.info_nce(jnp.asarray(sim[:1]), jnp.asarray([0]), 0.02)
    loss_b, _ = objectives.info_nce(jnp.asarray(sim[:1]), jnp.asarray([3]), 0.02)
    assert float(loss_b[0] - loss_a[0]) == pytest.approx((0.9 - 0.5) / 0.02, rel=1e-5)


def test_infonce_objective_uses_in_batch_negatives_and_checks_candidates():
    c = base_config()
    c.model.update(dict(kind="transformer", vocab_size=64, n_ctx=8, d_model=16, n_layers=1, n_heads=2))
    c.train.batch_size, c.retrieval.candidates = 4, 4
    model = build_model(c.model)
    # Jitted: one compile per function instead of one per operation (the same math).
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    q, ql = pad_rows([rng.integers(3, 64, size=k) for k in (3, 5, 2, 8)], n_ctx=8, pad_id=2)
    p, pl = pad_rows([rng.integers(3, 64, size=k) for k in (6, 4, 7, 1)], n_ctx=8, pad_id=2)
    batch = dict(query=q, query_length=ql, passage=p, passage_length=pl)
    apply_fn = lambda prm, *a, **k: model.apply({"params": prm}, *a, **k)  # noqa: E731
    loss, sums = jax.jit(objectives.build("infonce", objectives.context(c)),
                         static_argnums=0)(apply_fn, params, batch)
    embed = jax.jit(lambda prm, t, n: embed_rows(apply_fn, prm, t, n, -1, "right"))
    eq = embed(params, jnp.asarray(q), jnp.asarray(ql))
    ep = embed(params, jnp.asarray(p), jnp.asarray(pl))
    want, _ = objectives.info_nce(cosine_matrix(eq, ep), jnp.arange(4), 0.02)
    assert float(loss) == pytest.approx(float(jnp.mean(want)), rel=1e-4)
    assert float(sums["tokens"]) == 4
    c.retrieval.candidates = 32
    with pytest.raises(UserError, match="retrieval.candidates=32"):
        objectives.build("infonce", objectives.context(c))
    c.retrieval.candidates, c.model.kind = 4, "autoencoder"
    with pytest.raises(UserError, match="mixer or a transformer"):
        objectives.build("infonce", objectives.context(c))


def test_infonce_learns_a_synthetic_span_task():
    """Query = a random 7-token span of its passage: top-1 over 32 goes from chance to >= 90%."""
    V, N, L, SPAN, B = 256, 32, 24, 7, 32
    c = base_config()
    c.model.update(dict(kind="mixer", vocab_size=V, n_ctx=N, d_model=64, n_layers=2))
    c.train.batch_size, c.retrieval.candidates = B, B
    model = build_model(c.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, N), jnp.int32))["params"]
    loss_fn = objectives.build("infonce", objectives.context(c))
    apply_fn = lambda p, *a, **k: model.apply({"params": p}, *a, **k)  # noqa: E731
    rng = np.random.default_rng(0)

    def pairs(n):
        passages = [rng.integers(3, V, size=L) for _ in range(n)]
        starts = rng.integers(0, L - SPAN + 1, size=n)
        q, ql = pad_rows([d[s:s + SPAN] for d, s in zip(passages, starts)], n_ctx=N, pad_id=2)
        p, pl = pad_rows(passages, n_ctx=N, pad_id=2)
        return dict(query=q, query_length=ql, passage=p, passage_length=pl)

    held = pairs(256)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, batch):
        grads, _ = jax.grad(lambda prm: loss_fn(apply_fn, prm, batch), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    embed = jax.jit(lambda prm, t, n: embed_rows(apply_fn, prm, t, n, -2, "right"))

    def top1(params):
        q = embed(params, held["query"], held["query_length"])
        d = embed(params, held["passage"], held["passage_length"])
        return ranking.top1_by_pool(np.asarray(cosine_matrix(q, d)), [32], 0, 0)[32]

    before = top1(params)
    opt = tx.init(params)
    for _ in range(200):
        params, opt = step(params, opt, pairs(B))
    after = top1(params)
    assert before < 0.2, before  # chance is 1/32
    assert after >= 0.9, after


# --------------------------------------------------------------------------- pair data


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line)
    return str(path)


def _cfg(pairs, **kw):
    c = base_config().retrieval
    c.pairs = pairs
    c.update(kw)
    return c


def test_pairs_from_jsonl_and_parquet_with_field_names(tmp_path):
    records = [{"q": f"question {i}", "d": f"passage number {i}", "x": 1} for i in range(40)]
    records += [records[0], {"q": "other question", "d": records[1]["d"]},  # duplicates
                {"q": "", "d": "text"}, {"q": "q", "d": None}, {"q": "  ", "d": "t"}]  # empty
    path = _write_jsonl(tmp_path / "p.jsonl", records, [b'{"q": "caf\xe9", "d": "latin-1"}\n'])
    got = pairs_lib.read_pairs(_cfg(path, query_field="q", passage_field="d"))
    assert len(got) == 40 and got.queries[3] == "question 3" and got.passages[3] == "passage number 3"
    s = got.stats
    assert (s["duplicate_pairs"], s["duplicate_passages"], s["empty_pairs"], s["non_utf8_lines"]) == (1, 1, 3, 1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"d": [r["d"] for r in records[:40]], "q": [r["q"] for r in records[:40]]}),
                   str(tmp_path / "p.parquet"))
    from_parquet = pairs_lib.read_pairs(_cfg(str(tmp_path / "p.parquet"), query_field="q", passage_field="d"))
    assert from_parquet.queries == got.queries and from_parquet.passages == got.passages


def test_pair_split_is_deterministic_and_disjoint(tmp_path):
    records = [{"query": f"q{i}", "passage": f"passage {i} " * 3} for i in range(300)]
    got = pairs_lib.read_pairs(_cfg(_write_jsonl(tmp_path / "p.jsonl", records)))
    train, held = pairs_lib.split_pairs(got, 0.2)
    again_train, again_held = pairs_lib.split_pairs(got, 0.2)
    assert held.passages == again_held.passages and train.queries == again_train.queries
    assert len(train) + len(held) == 300 and 30 < len(held) < 90
    assert not set(train.passages) & set(held.passages)
    assert pairs_lib.held_out_fraction(_cfg("builtin")) == 0.35
    assert pairs_lib.held_out_fraction(_cfg("x.jsonl")) == 0.1


def test_builtin_pairs_are_summaries_and_their_text():
    assert pairs_lib.docstring_pair("Return the sum of a list.\n\nThe list must hold numbers; "
                                    "an empty list sums to 0 as usual.") == (
        "Return the sum of a list.", "The list must hold numbers; an empty list sums to 0 as usual.")
    assert pairs_lib.docstring_pair("One line only.") is None
    assert pairs_lib.docstring_pair("Two\nlines.\n\n" + "x" * 80) is None
    topic = ("The assert statement\n********************\n\nAssert statements are a convenient way "
             "to insert debugging assertions.\n\nSub part\n========\n\nshort")
    assert pairs_lib.topic_pairs(topic) == [("The assert statement", "Assert statements are a "
                                             "convenient way to insert debugging assertions.")]
    got = pairs_lib.read_pairs(_cfg("builtin", max_pairs=30))
    assert len(got) == 30 and all(q and p and q not in p[:0] for q, p in zip(got.queries, got.passages))


@pytest.mark.parametrize("records,raw,match", [
    ([{"query": "q", "text": "p"}], (), "no field 'passage'"),
    ([], (b"\x00\x01binary",), "looks binary"),
    ([], (b"{not json\n",), "not valid JSON"),
    ([{"query": "", "passage": ""}], (), "no usable pair"),
    ([{"query": 3, "passage": "p"}], (), "is a int, not a string"),
])
def test_bad_pair_files_are_one_line_errors(tmp_path, records, raw, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", records, raw)
    with pytest.raises(UserError, match=match) as e:
        pairs_lib.read_pairs(_cfg(path))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- pools and BM25


def test_pools_hold_the_answer_once_and_top1_counts_it():
    pools, answer = ranking.make_pools(50, 32, 0, seed=3)
    assert pools.shape == (50, 32)
    for i in range(50):
        assert pools[i, answer[i]] == i and len(set(pools[i])) == 32
    again, _ = ranking.make_pools(50, 32, 0, seed=3)
    np.testing.assert_array_equal(pools, again)
    assert ranking.top1(np.eye(50), pools, answer) == 1.0
    constant = ranking.top1(np.zeros((50, 50)), pools, answer)
    assert constant == pytest.approx(np.mean(answer == 0))  # first slot wins ties: chance
    assert ranking.make_pools(50, 8, 10, seed=0)[0].shape == (10, 8)
    assert ranking.pool_sizes((), 300) == [32, 64, 128, 256]
    with pytest.raises(UserError, match="larger than the held-out set"):
        ranking.pool_sizes((32, 512), 300)
    with pytest.raises(UserError, match="fewer than the smallest pool"):
        ranking.pool_sizes((), 20)


def test_bm25_finds_passages_by_their_words():
    passages = ["the cat sat on the mat", "stock markets fell sharply today",
                "a recipe for apple pie with cinnamon", "the python interpreter reads source files"]
    scores = ranking.bm25_scores(["apple cinnamon", "python source", "markets", "the and of"],
                                 passages)
    assert scores.shape == (4, 4)
    assert scores[:3].argmax(axis=1).tolist() == [2, 3, 1]
    assert not scores[3].any()  # stopwords only: no score


def test_plot_top1_against_pool_size(tmp_path, capsys):
    from mixers_jax import plot
    from tests_util import exit_status

    files = []
    for kind, acc in (("mixer", 0.5), ("transformer", 0.3)):
        result = {"pool_sizes": [32, 64], "model": {"32": acc, "64": acc / 2},
                  "bm25": {"32": 0.7, "64": 0.6}, "chance": {"32": 1 / 32, "64": 1 / 64},
                  "model_kind": kind, "workdir": str(tmp_path / kind)}
        files.append(str(tmp_path / f"{kind}.json"))
        with open(files[-1], "w", encoding="utf-8") as f:
            json.dump(result, f)
    out = tmp_path / "pools.png"
    assert exit_status(plot, ["plot", f"--pools={','.join(files)}", f"--out={out}"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "8 points" in capsys.readouterr().out
    with open(tmp_path / "other.json", "w", encoding="utf-8") as f:
        json.dump({"loss": 1.0}, f)
    assert exit_status(plot, ["plot", f"--pools={tmp_path / 'other.json'}", f"--out={out}"]) == 2
    assert "not a retrieval evaluation" in capsys.readouterr().err


# --------------------------------------------------------------------------- the training run


def test_retrieval_smoke_run_and_bad_input(tmp_path, monkeypatch):
    """The smoke preset trains, reports top-1 by pool with BM25 and evaluate gives the same
    numbers; bad pair input stops before anything is written."""
    from mixers_jax import evaluation

    config = load_config(config_path("retrieval", "smoke"))
    workdir = str(tmp_path / "run")
    summary = trainer_lib.run(config, workdir)
    table = summary["retrieval"]
    assert table["pool_sizes"] == [8, 16] and set(table) >= {"model", "bm25", "chance"}
    assert 0.0 <= table["model"][8] <= 1.0 and table["bm25"][8] > table["chance"][8]
    again = evaluation.evaluate_retrieval(workdir, bm25=False)
    assert again["model"] == table["model"]
    assert evaluation.tuned_on_pairs(workdir)

    def refused(match, **changes):
        c = load_config(config_path("retrieval", "smoke"))
        c.unlock()
        for k, v in changes.items():
            node, *rest = k.split(".")
            c[node][rest[0]] = v
        c.lock()
        target = str(tmp_path / f"bad{len(os.listdir(tmp_path))}")
        with pytest.raises(UserError, match=match):
            trainer_lib.run(c, target)
        assert not os.path.exists(target) or not os.listdir(target)

    refused("fewer than one batch of candidates", **{"retrieval.max_pairs": 9})
    refused("larger than the held-out set", **{"retrieval.pool_sizes": (8, 4096)})
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "passage": "p"}])
    refused("no field 'query'", **{"retrieval.pairs": bad})
    refused("mix pair objectives", **{"train.eval_objectives": ("clm",)})
