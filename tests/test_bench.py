"""``python -m mixers_jax.bench --suite=memory`` end to end on a tiny model: a table, the
memory / full-context ratio line per s, and JSON records whose token counts match the settings."""
import json
import os
import subprocess
import sys

import pytest

from tests_util import REPO, exit_status, xla_flags_with_devices


def test_memory_suite_runs_and_writes_records(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(None), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "mixers_jax.bench", "--suite=memory", "--chunks=2,3", "--n_ctx=8",
         "--d_model=32", "--n_layers=1", "--vocab=64", "--batch=2", "--steps=1",
         "--cases=memory_mixer,full_mixer", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "s=2: memory mixer step time / full-context mixer step time" in proc.stdout
    assert "s=3: memory mixer step time / full-context mixer step time" in proc.stdout
    records = json.loads(out.read_text())["records"]
    assert [(r["case"], r["chunks"]) for r in records] == [
        ("memory_mixer", 2), ("full_mixer", 2), ("memory_mixer", 3), ("full_mixer", 3)]
    for r in records:
        assert r["total_tokens"] == r["chunks"] * 8
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * r["total_tokens"])
        assert r["flops_per_token"] > 0
    # the memory model runs an encoder on top of a decoder of the same size: more FLOPs per token
    by = {(r["case"], r["chunks"]): r for r in records}
    assert by[("memory_mixer", 2)]["flops_per_token"] > by[("full_mixer", 2)]["flops_per_token"]


def test_memory_generate_suite_reports_speed_and_state(tmp_path, capsys):
    """In this process: a whole row generated (s·n − 1 tokens) by both cases; the carried state of
    the full-context mixer is its mixing inputs, L·(s·n)·d floats; the memory model's is its
    decoder's L·(n + s)·d floats, the s memory slots and the current chunk's n token ids."""
    from mixers_jax import bench

    out = tmp_path / "gen.json"
    status = exit_status(bench, [
        "bench", "--suite=memory_generate", "--chunks=3", "--n_ctx=8", "--d_model=32",
        "--n_layers=2", "--vocab=64", "--heads=2", "--gen_batches=1", "--steps=1", f"--out={out}"])
    printed = capsys.readouterr()
    assert status == 0, printed.err[-2000:]
    assert "s=3 batch 1: memory / full-context tokens/s = " in printed.out
    by = {r["case"]: r for r in json.loads(out.read_text())["records"]}
    assert set(by) == {"memory_mixer", "full_mixer"}
    for r in by.values():
        assert r["new_tokens"] == 23 and r["tokens_per_s"] > 0
    assert by["full_mixer"]["state_bytes"] == 2 * 24 * 32 * 4
    assert by["memory_mixer"]["state_bytes"] == 2 * (8 + 3) * 32 * 4 + 3 * 32 * 4 + 8 * 4


@pytest.mark.parametrize("args,pattern", [
    (["--suite=speed"], r"--suite"),
    (["--suite=memory", "--cases=memory_mixer,nope"], r"unknown case\(s\) \['nope'\]"),
    (["--suite=memory_generate", "--chunks=0"], r"--chunks"),
    (["--suite=mixing", "--contexts=256,x"], r"--contexts must be a comma list of positive integers"),
    (["--steps=0"], r"--steps"),
    (["--suite=runs"], r"--suite=runs needs --workdirs"),
    (["--suite=runs", "--workdirs=/nonexistent/run"], r"/nonexistent/run is not a training workdir"),
    (["extra"], r"unexpected arguments: extra"),
])
def test_bad_flags_are_one_line_status_2(capsys, args, pattern):
    """In this process; the command's own entry point runs in the test above."""
    import re

    from mixers_jax import bench

    status = exit_status(bench, ["bench", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines


def test_train_suite_reports_a_fraction_of_the_same_runs_matmul_rate(capsys):
    """The train suite measures the XLA matmul rate first and quotes every case against it."""
    from mixers_jax import benchmarks as bm

    rate = bm.matmul_rate("float32", repeats=1, size=128)
    assert rate > 0
    s = bm.Settings(d_model=32, n_layers=1, n_ctx=16, batch=8, vocab=64, heads=2, steps=1)
    (rec,) = bm.bench_train(["mixer_flat"], s)
    out = capsys.readouterr().out
    assert "1024x1024 float32 matmul:" in out and "GFLOP/s per device" in out
    assert rec["flop_rate"] == pytest.approx(rec["flops_per_token"] * rec["tokens_per_s"])
    assert rec["matmul_fraction"] == pytest.approx(
        rec["flop_rate"] / (rec["matmul_flops_per_s"] * 8))  # the 8 fake test devices
    assert 0 < rec["matmul_fraction"] < 1


def test_remat_suite_times_each_policy_against_none(capsys):
    from mixers_jax import benchmarks as bm

    # Two policies: the suite's code is the same for every policy after 'none' (the policies
    # themselves are compared in test_remat.py); 'matmuls_saved' also checks that a policy name
    # with an underscore is split from its model name. One layer: the ratios need no depth.
    s = bm.Settings(d_model=32, n_layers=1, n_ctx=16, batch=8, vocab=64, heads=2, steps=1)
    records = bm.bench_remat(["mixer_none", "mixer_matmuls_saved"], s)
    assert [(r["model"], r["remat"]) for r in records] == [
        ("mixer", "none"), ("mixer", "matmuls_saved")]
    assert records[0]["step_vs_none"] is None
    for r in records[1:]:
        assert r["step_vs_none"] == pytest.approx(r["step_s"] / records[0]["step_s"])
        assert r["temp_vs_none"] == pytest.approx(r["temp_bytes"] / records[0]["temp_bytes"])
    assert "mixer_matmuls_saved" in capsys.readouterr().out


def test_context_memory_suite_reports_peaks_and_the_ratio(capsys):
    """Compile-only: the transformer's attention grows as n², the mixer's activations as n."""
    from mixers_jax import benchmarks as bm

    s = bm.Settings(d_model=32, n_layers=1, batch=1, vocab=64, heads=2)
    records = bm.bench_context_memory(["mixer", "transformer"], [32, 256], s)
    by = {(r["case"], r["n_ctx"]): r for r in records}
    for r in records:
        assert r["peak_bytes"] >= r["argument_bytes"] + r["temp_bytes"] >= r["params_bytes"] > 0
    growth = {c: by[(c, 256)]["temp_bytes"] / by[(c, 32)]["temp_bytes"]
              for c in ("mixer", "transformer")}
    assert growth["transformer"] > growth["mixer"], growth
    assert "n_ctx 256: transformer peak / mixer peak = " in capsys.readouterr().out


def test_runs_suite_times_saved_configs_in_turn(tmp_path, capsys):
    """Each workdir's saved model at its own batch, timed round after round; the ratio line."""
    from mixers_jax import benchmarks as bm
    from mixers_jax import workdir as workdir_lib
    from mixers_jax.config import load_config

    dirs = []
    for name, spec, batch in (("flat", "mixer_clm.py:smoke", 8), ("headed", "mixer_clm.py:smoke", 16)):
        config = load_config(os.path.join(REPO, "configs", spec))
        config.unlock()
        config.model.update(dict(n_ctx=8, d_model=16, n_layers=1, vocab_size=64,
                                 heads=2 if name == "headed" else 0))
        config.train.batch_size = batch
        os.makedirs(tmp_path / name)
        workdir_lib.write_config(str(tmp_path / name), config)
        dirs.append(str(tmp_path / name))
    records = bm.bench_runs(dirs, bm.Settings(steps=2))
    out = capsys.readouterr().out
    assert [r["case"] for r in records] == dirs
    for rec, batch in zip(records, (8, 16)):
        assert len(rec["rounds"]) == 2 and rec["step_s"] == pytest.approx(sorted(rec["rounds"])[0] / 2
                                                                           + sorted(rec["rounds"])[1] / 2)
        assert rec["tokens_per_s"] * rec["step_s"] == pytest.approx(batch * 8)
    ratio = records[1]["step_s"] / records[0]["step_s"]
    assert f"{dirs[1]} step time / {dirs[0]} step time = {ratio:.3f}" in out
