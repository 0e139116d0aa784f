"""inspect: structure errors are 0 for matrices of that structure, heatmaps and JSON are written."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from mixers_jax import inspect as insp
from mixers_jax.models import mixing
from mixers_jax.workdir import load_run
from run_util import make_workdir
from tests_util import REPO


def test_structure_errors_recognise_structures():
    rng = np.random.default_rng(0)
    n = 12
    t = np.asarray(mixing.toeplitz_matrix(jnp.asarray(rng.standard_normal(n))), np.float64)
    assert insp.toeplitz_error(t) < 1e-6
    v = rng.standard_normal(n)
    for kind in ("col", "row"):
        a = np.asarray(mixing.srm_matrix(jnp.asarray(v, jnp.float32), jnp.float32(0.8),
                                         jnp.asarray(kind == "col")), np.float64)
        err, delta = insp.repeat_error(a, kind)
        assert err < 1e-5 and abs(delta - 0.8) < 1e-9
        assert insp.toeplitz_error(a) > 0.1
    dense = np.tril(rng.standard_normal((n, n)))
    assert min(insp.analyse(dense)[k] for k in ("toeplitz", "col_repeat", "row_repeat")) > 0.3


def test_inspect_writes_heatmaps(tmp_path):
    run = load_run(make_workdir(str(tmp_path / "run"), mixing="mixed", heads=2, block="srm"))
    records = insp.inspect_run(run, str(tmp_path / "out"))
    assert [r["matrix"] for r in records] == ["layer0_head0", "layer0_head1", "layer1_head0", "layer1_head1"]
    assert records[0]["col_repeat"] < 1e-5 and records[1]["row_repeat"] < 1e-5  # mixed: col, then row
    assert (tmp_path / "out" / "layer1_head1.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "structure.json").read_text())
    assert len(saved["matrices"]) == 4


def test_kernel_mixing_gives_one_causal_matrix_per_tap(tmp_path):
    """k = 3 taps, 2 heads: 2 layers x 3 taps x 2 heads matrices, each the masked slice of w."""
    run = load_run(make_workdir(str(tmp_path / "run"), heads=2, kernel=3))
    mats = insp.effective_matrices(run)
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
