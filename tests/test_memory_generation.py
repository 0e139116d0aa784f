"""Generation with memories: the step form of the chunked memory model (``MemoryLM.step``) equals
its parallel forward at every position of a row of several chunks (logits to fp32 tolerance, the
same argmax), greedy generation and compression run past one chunk, and the RMT baseline's missing
step form is a one-line error."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax import codec, generation
from mixers_jax.config import base_config, input_length
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.workdir import load_run
from run_util import make_workdir, sample_text
from tests_util import REPO

V, N, S = 64, 8, 3  # vocabulary, chunk length, chunks

MODELS = {
    "mixer": dict(),
    "mixer_nomemory": dict(use_memory=False),
    "transformer": dict(encoder={"kind": "transformer", "kernel": 1},
                        decoder={"kind": "transformer"}),
    "transformer_variable": dict(encoder={"kind": "transformer", "kernel": 1},
                                 decoder={"kind": "transformer"}, memory_slots="variable"),
}


def _model(overrides, kind="memory"):
    cfg = base_config().model
    cfg.update(dict(kind=kind, vocab_size=V, n_ctx=N, chunks=S, d_model=32, n_layers=2, n_heads=2))
    for role in ("encoder", "decoder"):
        cfg[role].update(overrides.get(role, {}))
    cfg.update({k: v for k, v in overrides.items() if k not in ("encoder", "decoder")})
    model = build_model(cfg)
    length = input_length(cfg)
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"])
    return cfg, model, params


@pytest.mark.parametrize("name", list(MODELS))
def test_step_form_equals_parallel_forward(name):
    cfg, model, params = _model(MODELS[name])
    tokens = jax.random.randint(jax.random.key(1), (2, S * N), 0, V)
    ref = np.asarray(model.apply({"params": params}, tokens))
    step = jax.jit(lambda t, p, c: model.apply({"params": params}, t, p, c, method="step"))
    cache = model.init_cache(2)
    got = []
    for p in range(S * N):
        logits, cache = step(tokens[:, p], jnp.int32(p), cache)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if "nomemory" not in name:  # the memories are used: the last chunk's logits depend on chunk 0
        other = tokens.at[:, 0].set((tokens[:, 0] + 1) % V)
        moved = np.asarray(model.apply({"params": params}, other))
        assert np.abs(moved[:, -N:] - ref[:, -N:]).max() > 1e-4


@pytest.mark.parametrize("name", ["mixer", "transformer_variable"])
def test_greedy_generation_past_a_chunk(name):
    """cached steps and the full parallel recompute give the same tokens over the whole row, and
    each generated token is the parallel forward's argmax at the position before it."""
    cfg, model, params = _model(MODELS[name])
    prompts = [[5, 9, 3], [7]]
    outs = {mode: generation.Generator(model, params, cfg, mode=mode).generate(prompts, S * N)
            for mode in ("cached", "full")}
    np.testing.assert_array_equal(outs["cached"], outs["full"])
    out = outs["cached"]
    assert out.shape == (2, S * N)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(out)))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(out[i, : len(p)], p)
        np.testing.assert_array_equal(out[i, len(p):], logits[i, len(p) - 1: S * N - 1].argmax(-1))


def test_rmt_has_no_step_form_but_generates_in_full_mode():
    cfg, model, params = _model({}, kind="rmt")
    with pytest.raises(UserError, match="no step form"):
        generation.Generator(model, params, cfg, mode="cached").generate([[4]], 3)
    out = generation.Generator(model, params, cfg, mode="full").generate([[4]], S * N)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(out)))
    np.testing.assert_array_equal(out[0, 1:], logits[0, :-1].argmax(-1))


@pytest.fixture(scope="module")
def memory_workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("memgen")
    return make_workdir(str(base / "memory"), kind="memory", chunks=2, n_ctx=8)


@pytest.fixture(scope="module")
def rmt_workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("memgen_rmt") / "rmt"), kind="rmt", chunks=2,
                        n_ctx=8)


def test_compress_refuses_rmt(rmt_workdir):
    with pytest.raises(UserError, match="no step form"):
        codec.encode_bytes(b"some text", load_run(rmt_workdir))


def test_compress_round_trip_past_one_chunk(memory_workdir):
    """Windows of chunks·n_ctx − 1 tokens (several chunks each), in lanes; decoding is exact."""
    run = load_run(memory_workdir)
    data = sample_text()[:600].encode()
    stream, stats = codec.encode_bytes(data, run, "auto", 3)
    assert stats["context"] == "restart" and stats["tokens"] > 2 * 2 * 8
    assert codec.decode_bytes(stream, run) == data


def _generate(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mixers_jax.generate", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def test_cli_generates_past_one_chunk(memory_workdir, rmt_workdir):
    """12 new tokens after a short prompt cross the chunk boundary at 8 (cached steps)."""
    r = _generate(f"--workdir={memory_workdir}", "--prompt=The", "--max_new_tokens=12",
                  "--temperature=0", "--mode=cached")
    assert r.returncode == 0 and r.stdout.startswith("The") and "stopped" not in r.stdout, r.stderr
    r = _generate(f"--workdir={rmt_workdir}", "--prompt=The", "--mode=cached")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and re.match(r"error: .*no step form", lines[0]), r.stderr
