"""Model-driven arithmetic coding: exact round trips (empty, one byte, random bytes, invalid UTF-8,
real text), clear failures for corrupted / truncated streams and a wrong workdir, the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mixers_jax import compress
from mixers_jax.errors import UserError
from mixers_jax.workdir import load_run
from run_util import make_workdir, sample_text
from tests_util import REPO


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
        stream, stats = compress.encode_bytes(data, run)
        assert compress.decode_bytes(stream, run) == data
        assert stats["compressed_bytes"] == len(stream)
    if name == "text":  # real tokens, not byte fallback
        assert not stats["byte_fallback_only"] and stats["tokens"] < len(data)


def test_tokens_cover_any_bytes(runs):
    tok = runs[0].tokenizer
    table = compress.token_byte_table(tok)
    for data in CASES.values():
        tokens, _ = compress.bytes_to_tokens(data, tok, table)
        assert compress.tokens_to_bytes(tokens, table) == data


def test_bad_streams_fail_clearly(runs):
    run, other = runs
    stream, _ = compress.encode_bytes(TEXT[:400], run)
    with pytest.raises(UserError, match="truncated"):
        compress.decode_bytes(stream[:-3], run)
    with pytest.raises(UserError, match="truncated"):
        compress.decode_bytes(stream[:20], run)
    corrupt = bytearray(stream)
    corrupt[compress.HEADER_BYTES + 5] ^= 0x10
    with pytest.raises(UserError, match="corrupted"):
        compress.decode_bytes(bytes(corrupt), run)
    with pytest.raises(UserError, match="another model"):
        compress.decode_bytes(stream, other)
    with pytest.raises(UserError, match="magic"):
        compress.decode_bytes(b"hello world, not a stream at all, really not one at all!!", run)


def test_arithmetic_coder_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(10):
        v, n = int(rng.integers(2, 40)), int(rng.integers(0, 200))
        tables = [rng.integers(1, 1 << int(rng.integers(1, 34)), v) for _ in range(n)]
        syms = [int(rng.integers(0, v)) for _ in range(n)]
        enc = compress.ArithmeticEncoder()
        for c, s in zip(tables, syms):
            cum = np.concatenate([[0], np.cumsum(c)])
            enc.encode(int(cum[s]), int(cum[s + 1]), int(cum[-1]))
        dec = compress.ArithmeticDecoder(enc.finish())
        assert [dec.decode(np.concatenate([[0], np.cumsum(c)])) for c in tables] == syms


def test_cli(runs, tmp_path):
    run, other = runs
    src, packed, out = tmp_path / "in.bin", tmp_path / "x.mxac", tmp_path / "out.bin"
    src.write_bytes(CASES["invalid_utf8"] + TEXT[:300])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mixers_jax.compress"]
    r = subprocess.run(cmd + ["encode", f"--workdir={run.workdir}", str(src), str(packed)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "model estimate" in r.stdout and "xz-9e" in r.stdout
    r = subprocess.run(cmd + ["decode", f"--workdir={other.workdir}", str(packed), str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "another model" in r.stderr and not out.exists()
    r = subprocess.run(cmd + ["decode", f"--workdir={run.workdir}", str(packed), str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
