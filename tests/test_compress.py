"""Model-driven arithmetic coding: exact round trips (empty, one byte, random bytes, invalid UTF-8,
real text) in every layout (restart / slide context, batched lanes), clear failures for corrupted /
truncated streams, a wrong workdir, another batch layout and old stream versions, the CLI."""
import os
import re
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from mixers_jax import arithmetic_coder, codec
from mixers_jax.errors import UserError
from mixers_jax.workdir import load_run
from run_util import make_workdir, sample_text
from tests_util import REPO, exit_status


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compress")
    a = make_workdir(str(base / "a"), seed=0)
    b = make_workdir(str(base / "b"), seed=1, mixing="mixed", heads=2, block="srm")
    return load_run(a), load_run(b)


TEXT = sample_text()[:1500].encode()
CASES = {
    "empty": b"",
    "one_byte": b"A",
    "random": np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes(),
    "invalid_utf8": b"caf\xc3\xa9 \xff\xfe ok \xc3( \xe2\x96\x81\xe2\x96 end\x00",
    "text": TEXT,
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(runs, name):
    data = CASES[name]
    for run in runs:  # a flat masked mixer (cached steps) and an SRM (recurrent steps)
        stream, stats = codec.encode_bytes(data, run)
        assert codec.decode_bytes(stream, run) == data
        assert stats["compressed_bytes"] == len(stream)
    if name == "text":  # real tokens, not byte fallback
        assert not stats["byte_fallback_only"] and stats["tokens"] < len(data)


@pytest.fixture(scope="module")
def slide_runs(tmp_path_factory):
    """A Toeplitz mixer and a RoPE transformer (both slide; n_ctx 16)."""
    base = tmp_path_factory.mktemp("compress_slide")
    toeplitz = make_workdir(str(base / "toeplitz"), seed=5, mixing="toeplitz", heads=2)
    transformer = make_workdir(str(base / "transformer"), seed=6, kind="transformer")
    return load_run(toeplitz), load_run(transformer)


LONG = CASES["invalid_utf8"] + TEXT  # ~500 tokens: lanes of several windows at batch 3


def _round_trip(run, data, context, batch):
    stream, st = codec.encode_bytes(data, run, context, batch)
    assert codec.decode_bytes(stream, run) == data
    assert codec.stream_layout(stream) == (st["context"], st["lanes"], st["tokens"])
    return st


def test_round_trip_layouts(runs, slide_runs):
    """Bit-exact in every layout: the flat mixer restarts (all windows in one batch, or lanes of
    several windows), the SRM, Toeplitz mixer and transformer also slide."""
    flat, srm = runs
    for batch in (1, 3, 1000):
        st = _round_trip(flat, LONG, "auto", batch)
        assert st["context"] == "restart" and st["lanes"] == min(batch, st["windows"])
        assert st["lane_length"] % 15 == 0 and st["lanes"] * st["lane_length"] >= st["tokens"]
    for run in (srm, *slide_runs):
        st = _round_trip(run, LONG, "slide", 3)
        assert st["context"] == "slide" and st["lanes"] == 3 and st["lane_length"] > 2 * 16
        auto = "restart" if run is slide_runs[0] else "slide"  # Toeplitz slides only when asked
        assert codec.resolve_context(run.model, "auto") == auto
        restart = _round_trip(run, LONG, "restart", 3)
        assert restart["context"] == "restart" and restart["tokens"] == st["tokens"]
        _round_trip(run, CASES["one_byte"], "slide", 3)


def test_layout_plan():
    """Lanes never exceed the batch or leave a lane empty, cover every token, and restart lanes
    hold whole windows; the decoder's header check accepts exactly the planned layouts."""
    for n in (1, 14, 15, 16, 44, 45, 46, 200, 1001):
        for batch in (1, 2, 3, 7, 64):
            for context in codec.CONTEXTS:
                lay = codec.Layout.plan(n, 16, context, batch)
                w = codec.window_count(n, 16)
                assert 1 <= lay.lanes <= min(batch, w)
                assert (lay.lanes - 1) * lay.lane_length < n <= lay.lanes * lay.lane_length
                if context == "restart":
                    assert lay.lane_length % 15 == 0
                assert lay.is_planned()
    assert not codec.Layout(200, 16, "restart", 13).is_planned()  # plan(200, 16, restart, 13) has 14
    with pytest.raises(UserError, match="--batch must be at least 1"):
        codec.Layout.plan(10, 16, "slide", 0)


def test_slide_needs_a_sliding_model(runs, embedding_runs):
    flat, _ = runs
    with pytest.raises(UserError, match="--context=slide needs a step form .* 'flat'-mixing mixer"):
        codec.encode_bytes(TEXT[:100], flat, "slide")
    with pytest.raises(UserError, match="--context must be one of"):
        codec.encode_bytes(TEXT[:100], flat, "sideways")
    with pytest.raises(UserError, match="restarts at every window"):
        codec.encode_bytes(TEXT[:100], embedding_runs[0], "slide")


def _with_header(stream, **changes):
    """``stream`` with header fields changed and a valid checksum (a consistent but other header)."""
    names = ("magic", "version", "flag", "length", "n", "payload_len", "fp", "digest", "context",
             "lanes")
    fields = dict(zip(names, codec._HEADER.unpack_from(stream)))
    fields.update(changes)
    return codec.pack_causal_header(tuple(fields.values())) + stream[codec.HEADER_BYTES:]


def test_decoder_refuses_another_layout_or_version(slide_runs):
    """The layout is the stream's: a damaged header is refused by its checksum; a consistent
    header with another lane count or context decodes to data that fails the hash; version-1
    streams are refused by name."""
    run = slide_runs[0]
    stream, st = codec.encode_bytes(LONG, run, "slide", 3)
    damaged = bytearray(stream)
    damaged[codec.HEADER_BYTES - 5] ^= 1  # the lane count
    with pytest.raises(UserError, match=r"corrupted stream \(header checksum\)"):
        codec.decode_bytes(bytes(damaged), run)
    for changes in ({"lanes": 2}, {"context": 0}):
        with pytest.raises(UserError, match="corrupted stream"):
            codec.decode_bytes(_with_header(stream, **changes), run)
    with pytest.raises(UserError, match=r"corrupted stream \(inconsistent header\)"):
        codec.decode_bytes(_with_header(stream, lanes=st["tokens"]), run)  # more lanes than windows
    old = struct.pack("<4sBBQQQ16s8s", b"MXAC", 1, 0, 10, 4, 3, bytes(16), bytes(8)) + b"abc"
    with pytest.raises(UserError, match=r"^stream format version 1 \(causal-LM streams of one batch"):
        codec.decode_bytes(old, run)


def test_tokens_cover_any_bytes(runs):
    tok = runs[0].tokenizer
    table = tok.piece_bytes()
    for data in CASES.values():
        tokens, _ = codec.bytes_to_tokens(data, tok, table)
        assert codec.tokens_to_bytes(tokens, table) == data


def test_bad_streams_fail_clearly(runs):
    run, other = runs
    stream, _ = codec.encode_bytes(TEXT[:400], run)
    with pytest.raises(UserError, match="truncated"):
        codec.decode_bytes(stream[:-3], run)
    with pytest.raises(UserError, match="truncated"):
        codec.decode_bytes(stream[:20], run)
    corrupt = bytearray(stream)
    corrupt[codec.HEADER_BYTES + 5] ^= 0x10
    with pytest.raises(UserError, match="corrupted"):
        codec.decode_bytes(bytes(corrupt), run)
    with pytest.raises(UserError, match="another model"):
        codec.decode_bytes(stream, other)
    with pytest.raises(UserError, match="magic"):
        codec.decode_bytes(b"hello world, not a stream at all, really not one at all!!", run)


def test_arithmetic_coder_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(10):
        v, n = int(rng.integers(2, 40)), int(rng.integers(0, 200))
        tables = [rng.integers(1, 1 << int(rng.integers(1, 34)), v) for _ in range(n)]
        syms = [int(rng.integers(0, v)) for _ in range(n)]
        enc = arithmetic_coder.ArithmeticEncoder()
        for c, s in zip(tables, syms):
            cum = np.concatenate([[0], np.cumsum(c)])
            enc.encode(int(cum[s]), int(cum[s + 1]), int(cum[-1]))
        dec = arithmetic_coder.ArithmeticDecoder(enc.finish())
        assert [dec.decode(np.concatenate([[0], np.cumsum(c)])) for c in tables] == syms


def test_piece_bytes_are_the_one_token_byte_table(runs):
    from mixers_jax.target_bytes import PieceBytes

    tok = runs[0].tokenizer
    pieces = tok.piece_bytes()
    assert [len(p) for p in pieces] == tok.token_bytes().tolist()
    assert PieceBytes.from_tokenizer(tok).pieces == list(pieces)
    ids = tok.byte_token_ids()
    assert [pieces[i] for i in ids] == [bytes([b]) for b in range(256)]
    text = sample_text()[:500] + " caf\u00e9 \u2581 \u4e2d"
    assert b"".join(pieces[i] for i in tok.encode(text)) == text.encode()


def _compress_subprocess(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mixers_jax.compress", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def _compress(capsys, *args):
    """The command run in this process (its exit status and printed output, like a subprocess's)."""
    from mixers_jax import compress

    capsys.readouterr()
    status = exit_status(compress, ["compress", *args])
    printed = capsys.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=printed.out, stderr=printed.err)


def _one_line(r, status, pattern):
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


def test_cli(runs, tmp_path, capsys):
    """The command's own entry point (a subprocess) encodes; decoding runs in this process."""
    run, other = runs
    src, packed = tmp_path / "in.bin", tmp_path / "x.mxac"
    src.write_bytes(CASES["invalid_utf8"] + TEXT[:300])
    r = _compress_subprocess("encode", f"--workdir={run.workdir}", str(src), str(packed))
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "model estimate" in r.stdout and "xz-9e" in r.stdout
    _decode_refused_then_exact(capsys, other, run, tmp_path, "another model")


def _decode_refused_then_exact(capsys, wrong, right, tmp_path, pattern):
    """x.mxac: decoding with ``wrong`` is a one-line error (exit 2, nothing written); with
    ``right`` it rebuilds in.bin exactly."""
    src, packed, out = tmp_path / "in.bin", tmp_path / "x.mxac", tmp_path / "out.bin"
    r = _compress(capsys, "decode", f"--workdir={wrong.workdir}", str(packed), str(out))
    _one_line(r, 2, pattern)
    assert not out.exists()
    r = _compress(capsys, "decode", f"--workdir={right.workdir}", str(packed), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()


def test_cli_decode_uses_the_streams_layout(slide_runs, tmp_path, capsys):
    """encode --context=slide --batch=3; decode with another --batch or --context is one line
    (exit 2, nothing written); with the same flags or none it rebuilds the input."""
    run = slide_runs[0]
    src, packed, out = tmp_path / "in.bin", tmp_path / "x.mxac", tmp_path / "out.bin"
    src.write_bytes(LONG)
    r = _compress(capsys, "encode", "--context=slide", "--batch=3", f"--workdir={run.workdir}",
                  str(src), str(packed))
    assert r.returncode == 0, r.stderr
    assert re.search(r"slide context in 3 lanes\).* \| [\d.]+ s, [\d.]+ KB/s$", r.stdout.strip())
    for flag, pattern in (("--batch=2", r"encoded in 3 lanes .* pass --batch=3\)"),
                          ("--context=restart", r"encoded with --context=slide")):
        r = _compress(capsys, "decode", flag, f"--workdir={run.workdir}", str(packed), str(out))
        _one_line(r, 2, pattern)
        assert not out.exists()
    r = _compress(capsys, "decode", "--batch=3", "--context=slide", f"--workdir={run.workdir}",
                  str(packed), str(out))
    assert r.returncode == 0 and out.read_bytes() == LONG, r.stderr
    assert re.search(r"KB/s$", r.stdout.strip())


def test_cli_refuses_to_overwrite_without_force(runs, tmp_path, capsys):
    run, _ = runs
    src, packed, out = tmp_path / "in.bin", tmp_path / "x.mxac", tmp_path / "out.bin"
    src.write_bytes(TEXT[:200])
    packed.write_bytes(b"precious")
    r = _compress(capsys, "encode", f"--workdir={run.workdir}", str(src), str(packed))
    _one_line(r, 2, r"exists; pass --force")
    assert packed.read_bytes() == b"precious"
    r = _compress(capsys, "encode", "--force", f"--workdir={run.workdir}", str(src), str(packed))
    assert r.returncode == 0, r.stderr
    out.write_bytes(b"keep me")
    r = _compress(capsys, "decode", f"--workdir={run.workdir}", str(packed), str(out))
    _one_line(r, 2, r"exists; pass --force")
    assert out.read_bytes() == b"keep me"
    r = _compress(capsys, "decode", "--force", f"--workdir={run.workdir}", str(packed), str(out))
    assert r.returncode == 0 and out.read_bytes() == src.read_bytes(), r.stderr


def test_cli_unwritable_output_is_one_line_status_1(runs, tmp_path, capsys):
    if os.geteuid() == 0:
        locked = "/proc/mixers_jax_cannot_write_here/x.mxac"  # root ignores file modes
    else:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o500)
        locked = str(folder / "x.mxac")
    src = tmp_path / "in.bin"
    src.write_bytes(TEXT[:100])
    r = _compress(capsys, "encode", f"--workdir={runs[0].workdir}", str(src), locked)
    _one_line(r, 1, r"^error: .*x\.mxac: \S")


@pytest.mark.parametrize("args,pattern", [
    (["encode", "--workdir=W", "a"], r"missing arguments"),
    (["encode", "--workdir=W", "a", "b", "c"], r"unexpected arguments: c"),
    (["squash", "--workdir=W", "a", "b"], r"unknown command 'squash'"),
    (["encode", "a", "b"], r"--workdir is required"),
    (["encode", "--workdir=W", "--level=3", "a", "b"], r"Unknown command line flag 'level'"),
])
def test_cli_bad_arguments(capsys, args, pattern):
    r = _compress(capsys, *args)
    _one_line(r, 2, pattern)


# --------------------------------------------------------------------------- stored-embedding streams


@pytest.fixture(scope="module")
def embedding_runs(tmp_path_factory):
    """An autoencoder (c = 2, float16) and an embedding_clm ('token' injection, bfloat16)."""
    base = tmp_path_factory.mktemp("compress_embedding")
    ae = make_workdir(str(base / "ae"), seed=2, kind="autoencoder", compression=2,
                      embed_quant="float16", embed_bits=16)
    clm = make_workdir(str(base / "clm"), seed=3, kind="embedding_clm", embed_quant="bfloat16",
                       embed_bits=16)
    return load_run(ae), load_run(clm)


EMB_CASES = {
    "empty": b"",
    "random": np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
    "invalid_utf8": CASES["invalid_utf8"],
    "text": sample_text()[:3000].encode(),
}


@pytest.mark.parametrize("name", list(EMB_CASES))
def test_embedding_round_trip(embedding_runs, name):
    data = EMB_CASES[name]
    for run in embedding_runs:
        stream, stats = codec.encode_bytes(data, run)
        assert codec.decode_bytes(stream, run) == data
        assert stats["compressed_bytes"] == len(stream) == stats["header_bytes"] + stats["payload_bytes"]
        per_window = run.config.model.d_model // run.config.model.compression * 16
        assert stats["embedding_bits"] == stats["windows"] * per_window
        assert stats["embedding_bits"] + stats["residual_bits"] == 8 * stats["payload_bytes"]


def _direct_nll_bits(run, data):
    """Σ −log2 p of the data's tokens under the model's own forward (the trainer's path: the encoder,
    the quantizing bottleneck, the decoder) on the codec's windows."""
    import jax

    tok = run.tokenizer
    tokens, _ = codec.bytes_to_tokens(data, tok, tok.piece_bytes())
    grid = codec.window_grid(tokens, run.config.model.n_ctx, tok.eos_id)
    logp = np.asarray(jax.nn.log_softmax(run.model.apply({"params": run.params}, grid), -1), np.float64)
    if run.config.model.kind == "autoencoder":  # logits[:, i] reconstructs token i
        logp = logp[:, 1:]
    else:  # logits[:, i] predicts token i + 1
        logp = logp[:, :-1]
    picked = np.take_along_axis(logp, grid[:, 1:, None], -1)[..., 0].reshape(-1)[: len(tokens)]
    return -picked.sum() / np.log(2.0)


def test_embedding_bits_match_the_estimate_and_the_accounting(embedding_runs):
    from mixers_jax.metrics import amortized_embedding_bpb

    data = EMB_CASES["text"]
    for run in embedding_runs:
        _, st = codec.encode_bytes(data, run)
        achieved = st["embedding_bits"] + st["residual_bits"]
        estimate = st["model_bits"] + st["embedding_bits"]
        assert abs(achieved - estimate) <= 0.01 * estimate
        assert abs(st["residual_bits"] - st["model_bits"]) <= 0.01 * st["model_bits"]
        # the coder's conditioning (the stored vector read back) is the model's own forward
        assert st["model_bits"] == pytest.approx(_direct_nll_bits(run, data), rel=1e-4)
        embedding_bpb = amortized_embedding_bpb(st["stored_numbers"], 16, st["windows"], len(data))
        assert st["embedding_bits"] / len(data) == pytest.approx(embedding_bpb, rel=1e-12)
        assert 8 * st["payload_bytes"] / len(data) == pytest.approx(st["accounting_total_bpb"], rel=0.01)


def test_embedding_int8_and_none_formats(tmp_path):
    """int8 stores 8-bit numbers plus one float32 scale per window; 'none' stores float32."""
    data = EMB_CASES["invalid_utf8"] + EMB_CASES["text"][:300]
    for quant, bits, extra in (("int8", 8, 32), ("none", 16, 0)):
        run = load_run(make_workdir(str(tmp_path / quant), seed=4, kind="autoencoder",
                                    embed_quant=quant, embed_bits=bits))
        stream, st = codec.encode_bytes(data, run)
        assert codec.decode_bytes(stream, run) == data
        per = {"int8": 8, "none": 32}[quant]
        assert st["embedding_bits"] == st["windows"] * (run.config.model.d_model * per + extra)


def _edited_workdir(run, dst, **model_fields):
    """A copy of ``run``'s workdir whose config.json has ``model_fields`` changed."""
    import json
    import shutil

    shutil.copytree(run.workdir, dst)
    path = os.path.join(dst, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["model"].update(model_fields)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return load_run(dst)


def test_embedding_format_mismatch(embedding_runs, tmp_path):
    ae, _ = embedding_runs
    stream, _ = codec.encode_bytes(EMB_CASES["text"][:400], ae)
    other = _edited_workdir(ae, str(tmp_path / "bf16"), embed_quant="bfloat16")
    with pytest.raises(UserError, match=r"embedding format mismatch: .*'float16'.*'bfloat16'"):
        codec.decode_bytes(stream, other)
    wrong_bits = _edited_workdir(ae, str(tmp_path / "bits8"), embed_bits=8)
    with pytest.raises(UserError, match=r"model.embed_bits=8 but model.embed_quant='float16' stores 16"):
        codec.encode_bytes(b"abc", wrong_bits)


def test_embedding_stream_kind_errors(runs, embedding_runs):
    causal, _ = runs
    ae, clm = embedding_runs
    causal_stream, _ = codec.encode_bytes(TEXT[:300], causal)
    ae_stream, _ = codec.encode_bytes(TEXT[:300], ae)
    assert causal_stream[4] == codec.VERSION == 3 and ae_stream[4] == codec.EMBEDDING_VERSION
    with pytest.raises(UserError, match="made by a causal LM; .* holds a model.kind='autoencoder'"):
        codec.decode_bytes(causal_stream, ae)
    with pytest.raises(UserError, match="made by a stored-embedding model .* model.kind='mixer'"):
        codec.decode_bytes(ae_stream, causal)
    with pytest.raises(UserError, match="made by a model.kind='autoencoder' model; .*'embedding_clm'"):
        codec.decode_bytes(ae_stream, clm)
    with pytest.raises(UserError, match="truncated"):
        codec.decode_bytes(ae_stream[:-2], ae)


def test_embedding_cli(runs, embedding_runs, tmp_path, capsys):
    causal, _ = runs
    ae, _ = embedding_runs
    src, packed = tmp_path / "in.bin", tmp_path / "x.mxac"
    src.write_bytes(CASES["invalid_utf8"] + TEXT[:300])
    r = _compress(capsys, "encode", f"--workdir={ae.workdir}", str(src), str(packed))
    assert r.returncode == 0, r.stderr
    assert re.search(r"= embedding [\d.]+ \(16 x float16 per window\) \+ residual [\d.]+\)", r.stdout)
    assert "accounting total bpb" in r.stdout and "xz-9e" in r.stdout
    _decode_refused_then_exact(capsys, causal, ae, tmp_path, "made by a stored-embedding model")
