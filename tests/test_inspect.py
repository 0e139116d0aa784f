"""inspect (mixers_jax/structure.py): structure errors are 0 for matrices of that structure,
heatmaps and JSON are written; the effective matrices are the ones the forward pass applies, for
every mixing op."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax import structure
from mixers_jax.config import base_config
from mixers_jax.models import build_model, mixing, mixing_math
from mixers_jax.models.specs import mixer_spec
from mixers_jax.workdir import load_run
from run_util import make_workdir
from tests_util import REPO


def test_structure_errors_recognise_structures():
    rng = np.random.default_rng(0)
    n = 12
    t = np.asarray(mixing_math.toeplitz_matrix(jnp.asarray(rng.standard_normal(n))), np.float64)
    assert structure.toeplitz_error(t) < 1e-6
    v = rng.standard_normal(n)
    for kind in ("col", "row"):
        a = np.asarray(mixing_math.srm_matrix(jnp.asarray(v, jnp.float32), jnp.float32(0.8),
                                         jnp.asarray(kind == "col")), np.float64)
        err, delta = structure.repeat_error(a, kind)
        assert err < 1e-5 and abs(delta - 0.8) < 1e-9
        assert structure.toeplitz_error(a) > 0.1
    dense = np.tril(rng.standard_normal((n, n)))
    assert min(structure.analyse(dense)[k] for k in ("toeplitz", "col_repeat", "row_repeat")) > 0.3


def test_inspect_writes_heatmaps(tmp_path):
    run = load_run(make_workdir(str(tmp_path / "run"), mixing="mixed", heads=2, block="srm"))
    records = structure.inspect_run(run, str(tmp_path / "out"))
    assert [r["matrix"] for r in records] == ["layer0_head0", "layer0_head1", "layer1_head0", "layer1_head1"]
    assert records[0]["col_repeat"] < 1e-5 and records[1]["row_repeat"] < 1e-5  # mixed: col, then row
    assert (tmp_path / "out" / "layer1_head1.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "structure.json").read_text())
    assert len(saved["matrices"]) == 4


def test_kernel_mixing_gives_one_causal_matrix_per_tap(tmp_path):
    """k = 3 taps, 2 heads: 2 layers x 3 taps x 2 heads matrices, each the masked slice of w."""
    run = load_run(make_workdir(str(tmp_path / "run"), heads=2, kernel=3))
    mats = structure.effective_matrices(run)
    assert [name for name, _ in mats[:6]] == [
        "layer0_head0_tap0", "layer0_head1_tap0", "layer0_head0_tap1", "layer0_head1_tap1",
        "layer0_head0_tap2", "layer0_head1_tap2"]
    assert len(mats) == 12
    w = np.asarray(run.params["block_0"]["mix"]["w"], np.float64)  # [H, n, n, k]
    for (name, a), (h, t) in zip(mats[:6], [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]):
        np.testing.assert_allclose(a, np.tril(w[h, :, :, t]), rtol=1e-6, err_msg=name)


def _inspect(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mixers_jax.inspect", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


def _one_line_status_2(r, pattern):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr


def test_cli(tmp_path):
    wd = make_workdir(str(tmp_path / "run"))
    out = tmp_path / "out"
    r = _inspect(f"--workdir={wd}", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 heatmaps" in r.stdout and (out / "structure.json").exists()
    existing = tmp_path / "file.txt"
    existing.write_text("keep")
    _one_line_status_2(_inspect(f"--workdir={wd}", f"--out={existing}"), "is a file")
    assert existing.read_text() == "keep"
    _one_line_status_2(_inspect(f"--workdir={wd}"), "--out is required")
    _one_line_status_2(_inspect(f"--workdir={wd}", f"--out={out}", "extra"), "unexpected arguments")


def test_cli_transformer_leaves_no_out_folder(tmp_path):
    wd = make_workdir(str(tmp_path / "tf"), kind="transformer")
    out = tmp_path / "out"
    _one_line_status_2(_inspect(f"--workdir={wd}", f"--out={out}"), "no token-mixing matrices")
    assert not out.exists()


def _op_cases():
    for name, op in mixing.MIXING_OPS.items():
        for causal in (True, False) if op.unmasked else (True,):
            for impl in op.impls:
                if impl in mixing.BLOCK_IMPLS and not causal:
                    continue  # the block-triangular forms are causal only
                yield pytest.param(name, causal, impl,
                                   id=f"{name}-{'causal' if causal else 'unmasked'}-{impl}")


@pytest.mark.parametrize("name,causal,impl", list(_op_cases()))
def test_effective_matrix_is_what_the_forward_applies(name, causal, impl):
    """A_ij from effective_matrices equals ∂y_i/∂x_j of the model's token-mixing layer (its
    Jacobian), for every op of the table, causal and unmasked, every implementation."""
    op, n = mixing.MIXING_OPS[name], 6
    heads = op.min_heads
    d = max(heads, 1)  # headed: one feature per head
    cfg = base_config().model
    cfg.update(dict(vocab_size=16, n_ctx=n, d_model=d, n_layers=1, mixing=name, heads=heads,
                    causal=causal, mixing_impl=impl))
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, n), jnp.int32))["params"])
    mix_p = dict(params["block_0"]["mix"])
    for key in [k for k in mix_p if k.startswith("lam")]:
        mix_p[key] = jnp.full_like(mix_p[key], 0.95)  # exercise the decay (it starts at 1)
    if heads:  # identity projections: head h reads and writes feature h only
        eye = jnp.eye(heads)
        mix_p["proj"] = {"kernel": eye[:, :, None], "bias": jnp.zeros((heads, 1))}
        mix_p["out"] = {"kernel": eye[:, None, :], "bias": jnp.zeros((heads,))}
    params = dict(params, block_0=dict(params["block_0"], mix=mix_p))
    mats = structure.effective_matrices(SimpleNamespace(config=SimpleNamespace(model=cfg), params=params))

    layer = mixing.TokenMixing(mixer_spec(cfg).token_mixing)
    # reverse mode: the blocked and Pallas forms define their gradient (custom_vjp), no jvp
    jac_NxDxNxD = jax.jacrev(lambda x: layer.apply({"params": mix_p}, x[None])[0])(jnp.zeros((n, d)))
    assert len(mats) == d
    for h, (_, a) in enumerate(mats):
        expected = np.asarray(jac_NxDxNxD[:, h, :, h], np.float64)
        assert a.shape == (n, n)
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
