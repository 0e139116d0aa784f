"""Generation: greedy tokens identical across modes (full recompute, cached steps, recurrent
steps), batched prompts of different lengths, the n_ctx stop, sampling filters and the CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax import generation
from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from run_util import make_workdir
from tests_util import REPO

V, N = 64, 16

MODELS = {
    "flat": (dict(), ("cached", "full")),
    "flat_headed": (dict(heads=2), ("cached", "full")),
    "toeplitz": (dict(mixing="toeplitz"), ("cached", "full")),
    "srm_mixed": (dict(mixing="mixed", heads=2, block="srm"), ("recurrent", "cached", "full")),
    "transformer": (dict(kind="transformer", n_heads=2), ("cached", "full")),
}


def _model(overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=32, n_layers=2))
    cfg.update(overrides)
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, N), jnp.int32))["params"])
    return cfg, model, params


PROMPTS = [[5, 9, 3], [7], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_identical_across_modes(name):
    overrides, modes = MODELS[name]
    cfg, model, params = _model(overrides)
    outs = {}
    for mode in modes:
        gen = generation.Generator(model, params, cfg, mode=mode, temperature=0.0)
        outs[mode] = gen.generate(PROMPTS, max_new=8)
    ref = outs[modes[0]]
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(ref[i, : len(p)], p)  # prompts kept
        assert (ref[i, len(p): len(p) + 8] != 2).any()
    for mode, out in outs.items():
        np.testing.assert_array_equal(out, ref, err_msg=f"{name}: {mode} vs {modes[0]}")
    # the full-recompute tokens are the parallel forward's greedy choices
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ref)))
    for i, p in enumerate(PROMPTS):
        for t in range(len(p) - 1, len(p) + 7):
            assert ref[i, t + 1] == logits[i, t].argmax()
    # a batch row equals generating that prompt alone
    alone = generation.Generator(model, params, cfg, mode=modes[0]).generate([PROMPTS[1]], 8)
    np.testing.assert_array_equal(alone[0], ref[1])


def test_stops_at_context_and_rejects_long_prompts():
    cfg, model, params = _model(dict(mixing="row", block="srm"))
    gen = generation.Generator(model, params, cfg, mode="recurrent")
    out = gen.generate([[1, 2]], max_new=100)
    assert out.shape == (1, N) and (out[0, 2:] != 2).any()
    assert gen.end_position([[1, 2]], 100) == (N, True)
    with pytest.raises(UserError, match="n_ctx"):
        gen.start([list(range(N + 1))])
    with pytest.raises(UserError, match="recurrent"):
        generation.resolve_mode(_model({})[0], "recurrent")


def test_sampling_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]] * 64)
    keys = jax.random.split(jax.random.key(0), 64)
    top1 = jax.vmap(lambda lg, k: generation.sample_logits(lg[None], k, 1.0, 1, 1.0))(logits, keys)
    assert set(np.asarray(top1).ravel()) == {1}
    top2 = jax.vmap(lambda lg, k: generation.sample_logits(lg[None], k, 5.0, 2, 1.0))(logits, keys)
    assert set(np.asarray(top2).ravel()) == {1, 3}
    nucleus = jax.vmap(lambda lg, k: generation.sample_logits(lg[None], k, 1.0, 0, 0.5))(logits, keys)
    assert set(np.asarray(nucleus).ravel()) == {1}  # p(1) ≈ 0.64 > 0.5


def test_cli_streams_text(tmp_path):
    wd = make_workdir(str(tmp_path / "run"), mixing="mixed", heads=2, block="srm")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mixers_jax.generate", f"--workdir={wd}", "--prompt=The",
           "--max_new_tokens=5", "--temperature=0", "--chunk=2"]
    outs = {}
    for mode in ("recurrent", "full"):
        r = subprocess.run(cmd + [f"--mode={mode}"], capture_output=True, text=True, cwd=REPO,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("The")
        outs[mode] = r.stdout
    assert outs["recurrent"] == outs["full"]
    r = subprocess.run(cmd[:3] + [f"--workdir={tmp_path}/missing", "--prompt=x"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("flag,pattern", [
    ("--top_k=-5", r"--top_k"), ("--temperature=-1", r"--temperature"), ("--top_p=0", r"--top_p"),
    ("--top_p=1.5", r"--top_p"), ("--max_new_tokens=-1", r"--max_new_tokens"),
    ("--batch=0", r"--batch"), ("--mode=fast", r"--mode"), ("--bogus=1", r"bogus"),
])
def test_cli_bad_values_are_one_line_status_2(tmp_path, flag, pattern):
    import re

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "mixers_jax.generate", f"--workdir={tmp_path}", flag],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), r.stderr
