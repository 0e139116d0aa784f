"""Stored-embedding accounting by hand (docs/metrics.md#stored-embedding-accounting); the evaluate
CLI's numbers equal a direct computation with the
model; --data; --quant on a stored-embedding model; bad input exits 2 with one line and no file."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from run_util import make_workdir, sample_text
from tests_util import REPO, exit_status

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax import evaluate, evaluation, metrics, target_bytes
from mixers_jax.config import base_config
from mixers_jax.data import pipeline, sources
from mixers_jax.models import MODEL_KINDS
from mixers_jax.workdir import load_run, with_defaults

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- metrics by hand


def test_loss_offset_reference_example():
    # docs/metrics.md#stored-embedding-accounting:
    # 64 dims x 4 bits, n_ctx 1024 -> 0.173 nats/token (every position a target).
    assert metrics.loss_offset(64, 4, 1, 1024) == pytest.approx(0.17329, abs=1e-5)
    assert metrics.loss_offset(64, 4, 10, 10 * 1024) == pytest.approx(64 * 4 * LN2 / 1024)
    # Causal rows of 1024 tokens have 1023 targets: the exact form divides by the real count.
    assert metrics.loss_offset(64, 4, 3, 3 * 1023) == pytest.approx(64 * 4 * LN2 / 1023)


def test_embedding_bpb_and_accounting_by_hand():
    # b_e = n_p b_p / (n_ctx r): 128 numbers x 16 bits over 512 tokens at 3.92 bytes/token.
    n_bytes = 4 * 512 * 3.92
    assert metrics.amortized_embedding_bpb(128, 16, 4, n_bytes) == pytest.approx(128 * 16 / (512 * 3.92))
    sums = {"nll": 300.0, "tokens": 100.0, "bytes": 400.0, "correct": 10.0}
    acc = metrics.embedding_accounting(sums, 8, 16, 5)
    assert acc["loss"] == pytest.approx(3.0)
    assert acc["bpb"] == pytest.approx(300 / (LN2 * 400))
    assert acc["loss_offset"] == pytest.approx(8 * 16 * LN2 * 5 / 100)  # 4.4361
    assert acc["normalized_loss"] == pytest.approx(3.0 + 4.436141955583)
    assert acc["embedding_bpb"] == pytest.approx(8 * 16 * 5 / 400)  # 1.6
    assert acc["total_bpb"] == pytest.approx(300 / (LN2 * 400) + 1.6)
    # The loss offset is the embedding bpb in nats per token: L_o = b_e ln2 (bytes / tokens).
    assert acc["loss_offset"] == pytest.approx(acc["embedding_bpb"] * LN2 * 400 / 100)


def test_information_ratio_both_h0():
    assert metrics.information_ratio(4.515) == pytest.approx(0.5)  # H0 = 9.03
    # docs/published_results.md#information-retention: mixer AE (validation-trained) CE 0.435 -> I_e 0.952.
    assert metrics.information_ratio(0.435) == pytest.approx(0.952, abs=5e-4)
    assert metrics.information_ratio_exact(0.435, 8000) == pytest.approx(1 - 0.435 / math.log(8000))
    assert math.log(8000) == pytest.approx(8.987, abs=1e-3)


def test_stored_numbers():
    m = base_config().model
    assert metrics.stored_numbers(m) is None  # mixer
    m.update({"kind": "autoencoder", "d_model": 512, "compression": 4})
    assert metrics.stored_numbers(m) == 128
    # docs/embedding_lms.md#published-configurations: 256-wide encoder, c=4 -> 64-dim memory
    m.encoder.d_model = 256
    m.kind = "embedding_clm"
    assert metrics.stored_numbers(m) == 64
    m.kind = "memory"
    assert metrics.stored_numbers(m) is None
    assert metrics.stored_numbers(dict(m.to_dict(), kind="autoencoder", compression=1)) == 256


# --------------------------------------------------------------------------- helpers


def test_piece_bytes_concatenate_to_the_text(clm_run):
    tok = load_run(clm_run).tokenizer
    table = target_bytes.PieceBytes.from_tokenizer(tok)
    text = "  Hello,\twörld!\n\u4e2d\u2581x \U0001F600 end\r\n"
    ids = tok.encode(text)
    assert table.join(ids) == b"".join(table.pieces[i] for i in ids) == text.encode("utf-8")
    assert [len(p) for p in table.pieces] == [int(n) for n in tok.token_bytes()]
    assert table.join([]) == b""


def test_target_text_rows_and_layers():
    table = target_bytes.PieceBytes([b"", b"a", b"bb", b"\xe2\x96"])
    tokens = np.array([[1, 2, 3, 0], [3, 2, 1, 1]])
    weights = np.array([[0.0, 1.0, 2.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    # row 0: layer 1 = bb, \xe2\x96, '' ; layer 2 = \xe2\x96 ; row 1: \xe2\x96, a
    assert target_bytes.target_text(tokens, weights, table) == b"bb\xe2\x96\xe2\x96\xe2\x96a"
    assert target_bytes.target_text(tokens, np.zeros((2, 4)), table) == b""


def test_parse_quants_and_objectives():
    assert evaluation.parse_quants("") == []
    assert evaluation.parse_quants("all") == list(metrics.QUANT_BITS)
    assert evaluation.parse_quants("int8, float16,int8") == ["int8", "float16"]
    with pytest.raises(evaluation.UserError, match="unknown --quant format 'fp4'"):
        evaluation.parse_quants("float16,fp4")
    c = base_config()
    assert evaluation.parse_objectives("", c) == ["clm"]
    c.train.eval_objectives = ("autoencode", "clm")
    assert evaluation.parse_objectives("", c) == ["autoencode", "clm"]
    with pytest.raises(evaluation.UserError, match="unknown objective 'nope'"):
        evaluation.parse_objectives("clm,nope", c)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    wd = make_workdir(str(tmp_path_factory.mktemp("eval") / "clm"))
    _edit_config(wd, data={"max_documents": 200})
    return wd


def _edit_config(wd, **sections):
    path = os.path.join(wd, "config.json")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)
    for section, values in sections.items():
        c[section].update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(c, f)


def _direct(run, rows, shift: bool):
    """Σ nll, Σ targets, Σ correct, Σ bytes and the target bytes, straight from the model."""
    b = pipeline.finish_batch(rows, pad_id=run.tokenizer.pad_id, token_bytes=run.tokenizer.token_bytes())
    logits = np.asarray(run.model.apply({"params": run.params}, jnp.asarray(rows)), np.float64)
    if shift:
        logits, targets = logits[:, :-1], rows[:, 1:]
        mask, nbytes = b["loss_mask"][:, 1:], b["token_bytes"][:, 1:]
    else:
        targets, mask, nbytes = rows, b["loss_mask"], b["token_bytes"]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    pieces = target_bytes.PieceBytes.from_tokenizer(run.tokenizer).pieces
    text = b"".join(pieces[t] for row, m in zip(targets, mask) for t in row[m > 0])
    return {"nll": float((nll * mask).sum()), "tokens": float(mask.sum()),
            "correct": float(((logits.argmax(-1) == targets) * mask).sum()),
            "bytes": float((nbytes * mask).sum()), "text": text,
            "sequences": int((mask.sum(1) > 0).sum())}


def _check(rec, want):
    assert rec["loss"] == pytest.approx(want["nll"] / want["tokens"], rel=1e-5)
    assert rec["tokens"] == want["tokens"] and rec["bytes"] == want["bytes"]
    assert rec["accuracy"] == pytest.approx(want["correct"] / want["tokens"])
    assert rec["bpb"] == pytest.approx(want["nll"] / (LN2 * want["bytes"]), rel=1e-5)
    assert rec["compressor_text_exact"] and rec["compressor_bytes"] == len(want["text"]) == want["bytes"]
    assert rec["compressors"] == pytest.approx(metrics.compressor_bpb(want["text"]))
    assert rec["sequences"] == want["sequences"]


def test_cli_numbers_equal_direct_computation(clm_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    tok_before = (Path(clm_run) / "tokenizer.model").read_bytes()
    # 40 rows in batches of 16 over the 8 test devices: the last batch is filled with pad rows.
    rc = exit_status(evaluate, ["evaluate", f"--workdir={clm_run}", f"--out={out}", "--max_rows=40",
                        "--objectives=clm,autoencode"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "objective" in printed.out and "xz-9e" in printed.out and "autoencode" in printed.out
    res = json.loads(out.read_text())
    assert {"workdir", "step", "config_name", "model_kind", "data", "environment", "objectives",
            "stored_numbers"} <= set(res)
    assert res["step"] == 1 and res["model_kind"] == "mixer" and res["stored_numbers"] is None
    assert {"device", "jax", "flax", "python"} <= set(res["environment"])
    assert res["data"]["rows"] == 40 and res["data"]["source"] == "validation split of embedded"
    assert (Path(clm_run) / "tokenizer.model").read_bytes() == tok_before

    run = load_run(clm_run)
    cfg = with_defaults(run.config)
    val = sources.split_documents(sources.load_documents(cfg.data), cfg.data.val_fraction)[1]
    rows = pipeline.pack_rows(pipeline.tokenize_documents(val, run.tokenizer), n_ctx=16,
                              packing="concat", pad_id=run.tokenizer.pad_id)[:40]
    _check(res["objectives"]["clm"], _direct(run, rows, shift=True))
    _check(res["objectives"]["autoencode"], _direct(run, rows, shift=False))
    # The text under the compressors excludes each row's first token (never a CLM target).
    assert res["objectives"]["autoencode"]["bytes"] > res["objectives"]["clm"]["bytes"]


def test_validation_rows_are_the_trainers(clm_run):
    """The default rows start with exactly the trainer's evaluation batches (same split, packing)."""
    run = load_run(clm_run)
    cfg = with_defaults(run.config)
    data = pipeline.build_data(cfg, tokenizer=run.tokenizer, save_tokenizer=False)
    trainer_rows = np.concatenate([b["tokens"] for b in data.eval_batches])
    ours = evaluation.eval_rows(cfg, run.tokenizer, max_rows=len(trainer_rows))
    np.testing.assert_array_equal(ours.rows, trainer_rows)
    everything = evaluation.eval_rows(cfg, run.tokenizer)
    np.testing.assert_array_equal(everything.rows[: len(trainer_rows)], trainer_rows)


def test_cli_data_file(clm_run, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(sample_text()[:3000], encoding="utf-8")
    out = tmp_path / "data.json"
    rc = exit_status(evaluate, ["evaluate", f"--workdir={clm_run}", f"--data={text}", f"--out={out}",
                        "--devices=1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["data"]["source"] == str(text)
    run = load_run(clm_run)
    docs = sources.load_documents(ml_collections.ConfigDict({"source": str(text)}))
    rows = pipeline.pack_rows(pipeline.tokenize_documents(docs, run.tokenizer), n_ctx=16,
                              packing="concat", pad_id=run.tokenizer.pad_id)
    assert res["data"]["rows"] == len(rows) > 16
    _check(res["objectives"]["clm"], _direct(run, rows, shift=True))


def _bad(argv, capsys, out):
    rc = exit_status(evaluate, ["evaluate", *argv, f"--out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    return err[0]


def test_cli_bad_input(clm_run, tmp_path, capsys):
    out = tmp_path / "never.json"
    assert "does not exist" in _bad([f"--workdir={tmp_path / 'missing'}"], capsys, out)
    empty_run = tmp_path / "no_ckpt"
    empty_run.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (empty_run / name).write_bytes((Path(clm_run) / name).read_bytes())
    assert "no checkpoints" in _bad([f"--workdir={empty_run}"], capsys, out)
    wd = f"--workdir={clm_run}"
    assert "unknown objective 'nope'" in _bad([wd, "--objectives=clm,nope"], capsys, out)
    assert "unknown --quant format" in _bad([wd, "--quant=float4"], capsys, out)
    assert "no data found" in _bad([wd, f"--data={tmp_path / 'none.txt'}"], capsys, out)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n ", encoding="utf-8")
    assert "empty" in _bad([wd, f"--data={blank}"], capsys, out)
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    assert "give no row of 16 tokens" in _bad([wd, f"--data={short}"], capsys, out)
    assert "Unknown command line flag" in _bad([wd, "--bogus=1"], capsys, out)


def test_cli_non_finite_loss_is_an_error(tmp_path, capsys, monkeypatch):
    # The trainer never saves a non-finite state; a checkpoint of an older version may hold one.
    with monkeypatch.context() as m:
        m.setattr(ckpt_lib, "all_finite", lambda tree: True)
        wd = make_workdir(str(tmp_path / "nan"), params_map=lambda p: p * jnp.nan)
    _edit_config(wd, data={"max_documents": 200})
    out = tmp_path / "nan.json"
    err = _bad([f"--workdir={wd}", "--max_rows=8", "--devices=1"], capsys, out)
    assert "non-finite" in err and "clm" in err


def test_cli_subprocess(clm_run, tmp_path):
    out = tmp_path / "sub.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mixers_jax.evaluate", f"--workdir={clm_run}", f"--out={out}",
           "--max_rows=8", "--quant=all"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "--quant skipped" in r.stdout
    assert json.loads(out.read_text())["data"]["rows"] == 8


# --------------------------------------------------------------------------- stored embedding


class _TinyAutoencoder(nn.Module):
    """Stand-in for kind 'autoencoder' while models/autoencoder.py is not registered: embedding ->
    mean over positions -> Bottleneck (compress, model.embed_quant) -> repeat + position -> head."""

    vocab: int
    n_ctx: int
    d: int
    compression: int
    quant: str

    @nn.compact
    def __call__(self, tokens):
        from mixers_jax.models.bottleneck import Bottleneck

        x = nn.Embed(self.vocab, self.d)(tokens)
        e = Bottleneck(d_in=self.d, compression=self.compression, quant=self.quant)(x.mean(1))
        pos = self.param("pos", nn.initializers.normal(1.0), (self.n_ctx, self.d))
        return nn.Dense(self.vocab, use_bias=False)(e[:, None, :] + pos[None]).astype(jnp.float32)


def _tiny_autoencoder(cfg):
    return _TinyAutoencoder(vocab=int(cfg["vocab_size"]), n_ctx=int(cfg["n_ctx"]), d=int(cfg["d_model"]),
                            compression=int(cfg["compression"]), quant=str(cfg["embed_quant"]))


def test_cli_stored_embedding_accounting_and_quant(tmp_path, monkeypatch, capsys):
    if "autoencoder" not in MODEL_KINDS:
        monkeypatch.setitem(MODEL_KINDS, "autoencoder", _tiny_autoencoder)
    wd = make_workdir(str(tmp_path / "ae"), kind="autoencoder", compression=2, embed_bits=8)
    _edit_config(wd, data={"max_documents": 200}, train={"objective": "autoencode"})
    out = tmp_path / "ae.json"
    rc = exit_status(evaluate, ["evaluate", f"--workdir={wd}", f"--out={out}", "--max_rows=12", "--devices=1",
                        "--quant=none,float16,float8_e5m2,int8"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "quantized embedding" in printed.out and "information ratio" in printed.out
    res = json.loads(out.read_text())
    assert res["stored_numbers"] == 16 and res["embed_bits"] == 8  # d 32 / c 2, model.embed_bits
    r = res["objectives"]["autoencode"]
    seq, tokens, nbytes = r["sequences"], r["tokens"], r["bytes"]
    assert seq == 12
    assert r["embedding_bpb"] == pytest.approx(16 * 8 * seq / nbytes)
    assert r["total_bpb"] == pytest.approx(r["bpb"] + 16 * 8 * seq / nbytes)
    assert r["loss_offset"] == pytest.approx(16 * 8 * LN2 * seq / tokens)
    assert r["normalized_loss"] == pytest.approx(r["loss"] + r["loss_offset"])
    assert r["information_ratio"] == pytest.approx(1 - r["loss"] / 9.03)
    assert r["information_ratio_exact"] == pytest.approx(1 - r["loss"] / math.log(400))
    q = r["quant"]
    assert {k: v["bits_per_number"] for k, v in q.items()} == {
        "none": 32, "float16": 16, "float8_e5m2": 8, "int8": 8}
    assert q["none"]["loss"] == pytest.approx(r["loss"], rel=1e-6)  # the run's embed_quant is none
    for name, v in q.items():
        bits = metrics.QUANT_BITS[name]
        assert v["total_bpb"] == pytest.approx(v["bpb"] + 16 * bits * seq / nbytes)
    # The sweep really rebuilds the model with each format: a coarse cast changes the loss.
    assert q["float8_e5m2"]["loss"] != q["none"]["loss"]



# --------------------------------------------------------------------------- random tokens


def test_random_rows_are_uniform_over_the_ids_with_text(clm_run):
    tok = load_run(clm_run).tokenizer
    rows, k = evaluation.random_rows((200, 16), tok, seed=3)
    ids = np.flatnonzero(np.asarray(tok.token_bytes()) > 0)
    assert k == len(ids) == tok.vocab_size - 3  # all but unk, bos and eos (= pad)
    assert rows.shape == (200, 16) and rows.dtype == np.int32
    assert set(np.unique(rows)) <= set(ids) and tok.pad_id not in rows
    assert len(np.unique(rows)) > 0.9 * k  # 3200 draws over ~400 ids reach nearly all of them
    np.testing.assert_array_equal(rows, evaluation.random_rows((200, 16), tok, seed=3)[0])
    assert not np.array_equal(rows, evaluation.random_rows((200, 16), tok, seed=4)[0])


class _CopyModel(nn.Module):
    """A trivial 'autoencoder': logits 30 · one_hot(input), i.e. it reproduces any input."""

    vocab: int

    @nn.compact
    def __call__(self, tokens):
        self.param("unused", nn.initializers.zeros, (1,))
        return 30.0 * jax.nn.one_hot(tokens, self.vocab, dtype=jnp.float32)


def _random_eval(wd, out, capsys, *extra):
    rc = exit_status(evaluate, ["evaluate", f"--workdir={wd}", "--data=random", f"--out={out}",
                                "--max_rows=8", "--devices=1", *extra])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    return json.loads(out.read_text()), printed.out


def test_random_token_evaluation_of_autoencoders(tmp_path, monkeypatch, capsys):
    """A (fresh) mixer autoencoder scores above ln V on random tokens; a model that copies its input
    scores below ln K, and the table says it encodes its input trivially."""
    wd = make_workdir(str(tmp_path / "ae"), kind="autoencoder", compression=2)
    _edit_config(wd, data={"max_documents": 200}, train={"objective": "autoencode"})
    res, printed = _random_eval(wd, tmp_path / "ae.json", capsys)
    d, r = res["data"], res["objectives"]["autoencode"]
    assert d["rows"] == 8 and d["row_length"] == 16 and d["random_ids"] == 397
    assert d["ln_v"] == pytest.approx(math.log(400)) and d["ln_random_ids"] == pytest.approx(math.log(397))
    assert r["tokens"] == 8 * 16  # no pads: every random token is a target
    assert r["loss"] > d["ln_v"]
    assert re.search(rf"random tokens, autoencode: loss {r['loss']:.4f} vs ln V = 5.9915 "
                     r"\(ln K = 5.9839, K = 397 ids drawn\): above ln V", printed)
    # another seed draws other rows (the same seed the same ones: test above)
    other, _ = _random_eval(wd, tmp_path / "other.json", capsys, "--random_seed=1")
    assert other["objectives"]["autoencode"]["loss"] != r["loss"]

    monkeypatch.setitem(MODEL_KINDS, "autoencoder", lambda cfg: _CopyModel(int(cfg["vocab_size"])))
    wd = make_workdir(str(tmp_path / "copy"), kind="autoencoder", compression=2)
    _edit_config(wd, data={"max_documents": 200}, train={"objective": "autoencode"})
    copy, printed = _random_eval(wd, tmp_path / "copy.json", capsys)
    assert copy["objectives"]["autoencode"]["loss"] < 1e-6
    assert "below ln K: the model reproduces random input (a trivial encoding)" in printed
