"""The CPU sweep: the experiment table, the runner (skip, resume, block, fail, equal wall time; with
stand-in commands, no training) and the results page from a fixture of run folders."""
import json
import os

import jax
import pytest

from mixers_jax import curriculum, experiments, results_page, sweep_runner
from mixers_jax.config import load_config
from mixers_jax.errors import Preempted
from mixers_jax.experiments import EXPERIMENTS, Experiment
from mixers_jax.models import build_model, example_input
from mixers_jax import trainer
from mixers_jax import sweep as sweep_command
from tests_util import REPO, exit_status

# --------------------------------------------------------------------------- the table


def test_table_is_sound_and_every_section_is_rendered():
    assert experiments.check_expectations() == []
    assert {e.section for e in EXPERIMENTS} <= set(results_page.SECTIONS)
    order = [e.name for e in experiments.select(None)]
    assert all(order.index(d) < order.index(e.name) for e in EXPERIMENTS for d in e.needs)
    assert [e.name for e in experiments.select("probe_ae")] == ["ae_mixer", "probe_ae"]
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.select("nope")


def _apply(config, overrides):
    """``--config.a.b=v`` strings applied with the type of the current value (as the flag does)."""
    config.unlock()
    for text in overrides:
        key, _, raw = text[len("--config."):].partition("=")
        *path, leaf = key.split(".")
        node = config
        for p in path:
            node = node[p]
        current = node[leaf]
        node[leaf] = (raw == "True") if isinstance(current, bool) else type(current)(raw)
    config.lock()
    return config


_MODEL_OVERRIDES = list({(e.config, e.overrides): e for e in reversed(EXPERIMENTS)
                         if any("model." in o for o in e.overrides)}.values())  # one per distinct model


@pytest.mark.parametrize("exp", _MODEL_OVERRIDES, ids=lambda e: e.name)
def test_experiments_with_model_overrides_build(exp):
    """Every preset builds (tests/test_configs.py); here the experiments' own model overrides."""
    overrides = [o for o in exp.overrides if "{" not in o]
    config = _apply(load_config(os.path.join(REPO, exp.config)), overrides)
    trainer.validate(config)
    model = build_model(config.model)
    example = example_input(config.model)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct(example.shape, example.dtype))
    assert sum(x.size for x in jax.tree.leaves(variables)) > 0


def test_equal_time_steps_and_overrides():
    assert experiments.equal_time_steps(1100, 0.3, 0.6) == 550
    own = {"steps": 1100, "warmup_steps": 100, "eval_every": 500, "checkpoint_every": 500}
    assert experiments.equal_time_overrides(400, own) == (
        "--config.train.steps=400", "--config.train.warmup_steps=36",
        "--config.train.eval_every=400", "--config.train.checkpoint_every=400")
    with pytest.raises(ValueError):
        experiments.equal_time_steps(10, 0.0, 1.0)


# --------------------------------------------------------------------------- the runner

_FAKE_TRAIN = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
wd = args["workdir"]
os.makedirs(wd, exist_ok=True)
calls = os.path.join(wd, "calls")
n = int(open(calls).read()) + 1 if os.path.exists(calls) else 1
open(calls, "w").write(str(n))
json.dump(sys.argv[1:], open(os.path.join(wd, f"argv{n}.json"), "w"))
mode = args.get("mode", "ok")
if mode == "fail" or (mode == "preempt_once" and n == 1):
    print("stopping", mode)
    sys.exit(75 if mode == "preempt_once" else 1)
json.dump({"eval": {"loss": 1.0}, "final_step": 3}, open(os.path.join(wd, "results.json"), "w"))
"""
_FAKE_BENCH = """
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
records = []
for wd in args["workdirs"].split(","):
    if not os.path.isdir(os.path.join(wd, "tb")):
        sys.exit(1)
    records.append({"case": wd, "step_s": float(open(os.path.join(wd, "step_s")).read())})
json.dump({"suite": args["suite"], "records": records}, open(args["out"], "w"))
"""
_FAKE_AFTER = "import sys; open(sys.argv[1].split('=', 1)[1], 'w').write('{}')\n"


def _tb(folder, tags):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(folder, "tb"))
    for tag, points in tags.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def _finished(folder, steps, step_s):
    os.makedirs(folder)
    json.dump({"train": {"steps": steps, "warmup_steps": 10, "eval_every": 50, "checkpoint_every": 50}},
              open(os.path.join(folder, "config.json"), "w"))
    json.dump({"eval": {"loss": 2.0}}, open(os.path.join(folder, "results.json"), "w"))
    _tb(folder, {"perf/step_s": [(10, 99.0)]})  # logged while training: not what the plan reads
    open(os.path.join(folder, "step_s"), "w").write(str(step_s))  # what the stand-in bench measures


def test_runner_skips_resumes_blocks_and_records(tmp_path):
    (tmp_path / "fake_train.py").write_text(_FAKE_TRAIN)
    (tmp_path / "fake_after.py").write_text(_FAKE_AFTER)
    (tmp_path / "fake_bench.py").write_text(_FAKE_BENCH)
    out = tmp_path / "results"
    _finished(str(out / "ref"), 100, 0.2)
    _finished(str(out / "own"), 100, 0.4)
    table = [
        Experiment("a", "autoencoders", "A", "x.py", ("--mode=ok",),
                   after=(("after.json", ("fake_after", "--out={run}/after.json")),)),
        Experiment("b", "autoencoders", "B", "x.py", ("--mode=preempt_once",), needs=("a",)),
        Experiment("c", "autoencoders", "C", "x.py", ("--mode=fail",)),
        Experiment("d", "autoencoders", "D", "x.py", needs=("c",)),
        Experiment("ref", "clm", "R", "x.py"), Experiment("own", "clm", "O", "x.py"),
        Experiment("t", "clm_time", "T", "x.py", equal_time="ref", measure="own", needs=("ref", "own")),
    ]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    def sweep(lines):
        return sweep_runner.Sweep(table, str(out), print_fn=lines.append, env=env, train_module="fake_train",
                                  bench_module="fake_bench")

    first = []
    with pytest.raises(Preempted, match="during b"):
        sweep(first).run()
    assert first[0] == "[1/7] a: running" and first[1].startswith("[1/7] a: done in ")
    assert first[2:] == ["[2/7] b: running"]
    assert (out / "a" / "after.json").exists()

    second = []
    failed = sweep(second).run()
    assert failed == ["c", "d"]
    assert second[0] == "[1/7] a: skipped (finished)"
    assert second[1] == "[2/7] b: running" and second[2].startswith("[2/7] b: done in ")
    assert second[3] == "[3/7] c: running" and second[4].startswith("[3/7] c: failed after ")
    assert second[5] == "[4/7] d: blocked: needs c (not finished)"
    assert second[6:8] == ["[5/7] ref: skipped (finished)", "[6/7] own: skipped (finished)"]
    assert (out / "a" / "calls").read_text() == "1"  # a finished run is never rerun
    record = json.loads((out / "b" / "sweep.json").read_text())
    assert [c["exit"] for c in record["commands"]] == [75, 0] and record["status"] == "done"
    assert record["wall_s"] == pytest.approx(sum(c["wall_s"] for c in record["commands"]), abs=0.01)
    assert "stopping preempt_once" in (out / "b" / "sweep.log").read_text()
    assert json.loads((out / "c" / "sweep.json").read_text())["status"] == "failed"
    assert sweep_runner.status(table[2], str(out)) == "failed"

    plan = json.loads((out / "t" / "sweep.json").read_text())["equal_time"]
    assert (plan["steps"], plan["ref_step_s"], plan["step_s"]) == (50, pytest.approx(0.2), pytest.approx(0.4))
    timing = json.loads((out / "t" / "step_times.json").read_text())
    assert [r["case"] for r in timing["records"]] == [str(out / "ref"), str(out / "own")]
    assert "--suite=runs" in (out / "t" / "sweep.log").read_text()
    argv = json.loads((out / "t" / "argv1.json").read_text())
    assert argv[-4:] == ["--config.train.steps=50", "--config.train.warmup_steps=5",
                         "--config.train.eval_every=50", "--config.train.checkpoint_every=50"]

    (out / "own" / "tb").rename(out / "own" / "tb_moved")  # the stand-in bench fails: no plan
    third = []
    table.append(Experiment("t2", "clm_time", "T2", "x.py", equal_time="ref", measure="own"))
    table.append(Experiment("t3", "clm_time", "T3", "x.py", equal_time="ref", measure="own"))
    (out / "t3").mkdir()  # a run started earlier: its recorded steps are kept
    (out / "t3" / "sweep.json").write_text(json.dumps(
        {"name": "t3", "wall_s": 1.0, "commands": [],
         "equal_time": {"overrides": ["--config.train.steps=77"]}}))
    assert sweep(third).run() == ["c", "d", "t2"]
    assert third[-3] == (f"[8/9] t2: failed: t2: no step times of {out}/ref and {out}/own in "
                         f"{out}/t2/step_times.json")
    assert not (out / "t2" / "results.json").exists() and not (out / "t2" / "calls").exists()
    assert third[-1].startswith("[9/9] t3: done in ")
    assert json.loads((out / "t3" / "argv1.json").read_text())[-1] == "--config.train.steps=77"

    dry = []
    sweep(dry).dry_run()
    assert dry[0] == "[1/9] a: skipped (finished)" and any(l.startswith("[3/9] c: would run") for l in dry)


# --------------------------------------------------------------------------- the page


def _run_folder(out, name, loss, *, results=True, extra=None, quant=None):
    folder = os.path.join(out, name)
    os.makedirs(folder)
    json.dump({"name": name, "model": {"n_ctx": 64}, "train": {"steps": 4}},
              open(os.path.join(folder, "config.json"), "w"))
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write(f"training {name}: mixer, 3.17M params, 4 steps x 2048 tokens\n")
    _tb(folder, {"eval/loss": [(2, loss + 0.5), (4, loss)], "train/loss": [(1, loss + 1), (4, loss)],
                 "perf/step_s": [(4, 0.65)]})
    if results:
        ev = {"loss": loss, "accuracy": 0.079, "bpb": 2.539, "tokens": 10.0, "bytes": 20.0, **(extra or {})}
        json.dump({"eval": ev, "evals": {"autoencode": ev}, "eval_history": [[2, loss + 0.5], [4, loss]],
                   "final_step": 4, "compressors": {"gzip-9": 2.6}},
                  open(os.path.join(folder, "results.json"), "w"))
        json.dump({"name": name, "wall_s": 543.0, "status": "done", "commands": []},
                  open(os.path.join(folder, "sweep.json"), "w"))
    if quant:
        json.dump({"objectives": {"clm": {"loss": quant["none"], "quant": {
            q: {"loss": v, "bpb": 2.0, "normalized_loss": v + 1, "total_bpb": 3.0, "bits_per_number": 8}
            for q, v in quant.items()}}}}, open(os.path.join(folder, "quant.json"), "w"))


def test_page_from_run_folders_names_missing_runs_and_draws_figures(tmp_path):
    out = str(tmp_path / "results")
    _run_folder(out, "ae_mixer", 5.052, extra={"accuracy": 0.832})
    _run_folder(out, "ae_transformer", 6.240)
    _run_folder(out, "ae_unmasked", 5.0, results=False)  # started, not finished
    _run_folder(out, "ae_transformer_mixer", 4.9)  # below the mixer's loss: the direction fails
    _run_folder(out, "eclm_mixer", 3.9, extra={"normalized_loss": 4.2, "total_bpb": 2.6},
                quant={"none": 3.9, "float16": 3.9, "bfloat16": 3.91, "int8": 3.95,
                       "float8_e4m3fn": 4.5, "float8_e5m2": 3.8})
    json.dump({"cpu_count": 2, "cpu_model": "Test CPU", "matmul_gflops": 65.0},
              open(os.path.join(out, "machine.json"), "w"))
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# Results\n\nHand-written header.\n\n{results_page.BEGIN}\nold\n{results_page.END}\n"
                    "Footer.\n")
    figures = str(tmp_path / "docs" / "figures" / "results")
    written = results_page.write_page(out, str(page), figures, shown="results")
    text = page.read_text()
    assert text.startswith("# Results\n\nHand-written header.") and text.endswith("Footer.\n")
    assert "\nold\n" not in text
    assert "9m03s" in text and "on 2 cores (Test CPU, XLA 1024×1024 fp32 matmul 65.0 GFLOP/s)" in text
    ae_row = next(l for l in text.splitlines() if l.startswith("| masked mixer (causal"))
    assert "| 5.0520 | 83.2% | 2.5390 | 0.4405 | 3.17M | 0.650 | 9m03s |" in ae_row
    assert "holds here (accuracy 83.2% vs 7.9% (transformer (8 heads, unrolled)), expected >)" in ae_row
    assert "not finished: results/ae_unmasked" in text
    hybrid_row = next(l for l in text.splitlines() if "`results/ae_transformer_mixer`" in l)
    assert ("does not hold here (loss 4.9000 vs 5.0520 (masked mixer (causal encoder and decoder)), "
            "expected >). Decided at scale by `autoencoder.py:tinystories` vs the same with "
            "`--config.model.encoder.kind=transformer`." in hybrid_row)
    assert "Decided at scale" not in ae_row
    assert "| not run: results/ae_both_unmasked |" in text
    assert "not run: results/clm_text_flat (needs `--text=FILE`)" in text
    assert "Not measured here (results/ae_unmasked has no result)" in text
    quant_rows = [l for l in text.splitlines() if "`results/eclm_mixer`" in l and "float8" in l]
    assert "| float8_e4m3fn | 8 | 4.5000 |" in quant_rows[0] and "does not hold" in quant_rows[1]
    assert os.path.join(figures, "autoencoders.png") in written
    assert "![Autoencoders](figures/results/autoencoders.png)" in text
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "fresh.md"  # a page without markers is written fresh
    results_page.write_page(out, str(again), figures, shown="results")
    assert again.read_text().startswith(f"# Results\n\n{results_page.BEGIN}\n")


def test_command_dry_run_and_bad_names(tmp_path, capsys):
    out = str(tmp_path / "results")
    assert exit_status(sweep_command, ["sweep", f"--out={out}", "--only=probe_ae", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/2] ae_mixer: would run (absent)" and lines[2] == "[2/2] probe_ae: would run (absent)"
    assert f"--config.train.init_from={out}/ae_mixer" in lines[3]
    assert not os.path.exists(out)  # a dry run writes nothing
    assert exit_status(sweep_command, ["sweep", f"--out={out}", "--only=nope"]) == 2
    assert "error: unknown experiment(s) nope" in capsys.readouterr().err


def _abstract_structs(config):
    model = build_model(config.model)
    example = example_input(config.model)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct(example.shape, example.dtype))
    return variables["params"]


def _shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


def _abstract_params(config):
    return _shapes(_abstract_structs(config))


def test_memory_probe_encoder_matches_the_memory_model():
    """probe_memory loads memory_main's encoder: the same parameter shapes (checked abstractly),
    the main job's scanned blocks stacked as the probe's unscanned ones (as init_from loads them)."""
    exp, source = experiments.BY_NAME["probe_memory"], experiments.BY_NAME["memory_main"]
    probe = _apply(load_config(os.path.join(REPO, exp.config)), [o for o in exp.overrides if "{" not in o])
    memory = load_config(os.path.join(REPO, source.config))
    probe_enc, memory_enc = _abstract_structs(probe)["encoder"], _abstract_structs(memory)["encoder"]
    assert "blocks" in memory_enc and "block_0" in probe_enc
    assert _shapes(curriculum.in_block_layout(probe_enc, memory_enc)) == _shapes(probe_enc)
