"""Profiling: jaxpr FLOP counts vs the analytic count, cost/memory analyses, traces, the AOT check."""
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mixers_jax import profiling, trainer
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from tests_util import REPO, config_path, exit_status, xla_flags_with_devices

# Model kinds whose jaxpr FLOPs must match flops.py within 2%: (id, config module, model
# overrides; nested dicts update model.encoder / model.decoder).
FLOP_MODELS = [
    ("mixer_flat", "mixer_clm", {}),
    ("mixer_headed", "mixer_clm", {"heads": 4}),
    ("mixer_toeplitz", "mixer_clm", {"mixing": "toeplitz"}),
    ("mixer_expanded", "mixer_clm", {"expanded": True}),
    ("transformer", "transformer_clm", {"n_heads": 4}),
    # Chunked memory models (docs/memory_models.md#rows-and-chunks): rows of chunks x n_ctx = 2 x 32 tokens.
    ("memory_mixer", "mixer_clm", {"kind": "memory", "chunks": 2, "n_ctx": 32,
                                   "encoder": {"d_model": 32}, "compression": 2}),
    ("memory_transformer_decoder", "mixer_clm",
     {"kind": "memory", "chunks": 2, "n_ctx": 32, "n_heads": 4,
      "decoder": {"kind": "transformer"}, "memory_slots": "variable"}),
    ("memory_no_memory", "mixer_clm", {"kind": "memory", "chunks": 2, "n_ctx": 32,
                                       "use_memory": False}),
    ("rmt_mixer", "mixer_clm", {"kind": "rmt", "chunks": 2, "n_ctx": 32}),
    ("rmt_transformer", "mixer_clm", {"kind": "rmt", "chunks": 2, "n_ctx": 32, "n_heads": 4,
                                      "decoder": {"kind": "transformer"}}),
    # Autoencoders (docs/autoencoders.md) and oracle-embedding CLMs (docs/embedding_lms.md); the FLOPs
    # do not depend on the
    # objective, so the smoke config's clm objective is kept.
    ("ae_mixer", "mixer_clm", {"kind": "autoencoder", "compression": 4}),
    ("ae_mixer_kernel_unroll", "mixer_clm", {"kind": "autoencoder", "expansion": "unroll",
                                             "encoder": {"kernel": 4}, "decoder": {"heads": 2}}),
    ("ae_transformer", "mixer_clm", {"kind": "autoencoder", "n_heads": 4, "expansion": "unroll",
                                     "encoder": {"kind": "transformer"},
                                     "decoder": {"kind": "transformer"}}),
    ("ae_hybrid_half_width", "mixer_clm", {"kind": "autoencoder", "n_heads": 4,
                                           "decoder": {"kind": "transformer", "d_model": 32}}),
    ("eclm_token", "mixer_clm", {"kind": "embedding_clm", "injection": "token", "compression": 2,
                                 "encoder": {"causal": False}}),
    ("eclm_embedding", "mixer_clm", {"kind": "embedding_clm", "injection": "embedding",
                                     "compression": 4, "encoder": {"d_model": 32}}),
    ("eclm_add_transformer", "mixer_clm", {"kind": "embedding_clm", "injection": "add",
                                           "n_heads": 4, "encoder": {"kind": "transformer"},
                                           "decoder": {"kind": "transformer", "d_model": 32}}),
    ("eclm_token_transformer", "mixer_clm", {"kind": "embedding_clm", "injection": "token",
                                             "n_heads": 4, "decoder": {"kind": "transformer"}}),
]


def _config(module="mixer_clm", preset="smoke", **model):
    config = load_config(config_path(module, preset))
    config.unlock()
    config.model.update(dict(n_ctx=64, d_model=64, vocab_size=384))
    config.model.update(model)
    config.lock()
    return config


@pytest.mark.parametrize("name,module,model", FLOP_MODELS, ids=[m[0] for m in FLOP_MODELS])
def test_jaxpr_flops_match_analytic_within_2_percent(name, module, model):
    from mixers_jax import flops

    config = _config(module, **model)
    steps, state, batch = profiling.setup(config, "1x1x1")
    tokens = batch["tokens"].size
    for jp, training in ((profiling.train_step_jaxpr(steps, state, batch), True),
                         (profiling.forward_jaxpr(steps, state, batch), False)):
        counted = profiling.count_flops(jp)
        analytic = flops.flops_per_token(config.model, training=training)
        ratio = analytic / (counted["total"] / tokens)
        assert 0.98 <= ratio <= 1.02, (name, training, ratio)
        assert counted["ops"] and all(op[0] == "dot_general" for op in counted["ops"])


def test_count_flops_recurses_into_scan_and_counts_conv():
    import jax.numpy as jnp

    def f(x, w, k):
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)
        z = jax.lax.conv_general_dilated(y[None, None], k, (1, 1), "VALID")
        return z.sum()

    x, w, k = jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((5, 1, 3, 3))
    counted = profiling.count_flops(jax.make_jaxpr(f)(x, w, k))
    assert counted["by_primitive"]["dot_general"] == 3 * 2 * 4 * 8 * 8
    assert counted["by_primitive"]["conv_general_dilated"] == 2 * (5 * 2 * 6) * 1 * 9


def test_cost_memory_jaxpr_hlo_in_process(tmp_path):
    config = _config(heads=2)
    lines = []
    report = profiling.profile(config, ["jaxpr", "hlo", "cost", "memory"], str(tmp_path), "2x2x2",
                             echo=lines.append)
    for name in ("train_step.jaxpr.txt", "forward.jaxpr.txt", "train_step.hlo.txt",
                 "forward.hlo.txt", "profile.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    cost = report["cost"]["train_step"]
    assert cost["jaxpr_flops_per_token"] == pytest.approx(cost["analytic_flops_per_token"], rel=0.02)
    assert cost["xla_flops_per_token"] > 0
    mem = report["memory_per_device"]
    assert mem["temp_size_in_bytes"] > 0 and mem["argument_size_in_bytes"] > 0
    # Sharded over 2x2x2: the per-device parameter bytes are below the whole model's.
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_of(config)))
    assert mem["params_bytes"] < whole
    assert any("FLOPs/token" in ln for ln in lines)


def state_of(config):
    _, state, _ = profiling.setup(config, "1x1x1")
    return state.params


def test_trace_on_cpu_times_steps_and_writes_a_tensorboard_profile(tmp_path):
    config = _config()
    report = profiling.profile(config, ["trace"], str(tmp_path), n_steps=2, echo=lambda *_: None)
    t = report["trace"]
    assert t["step_s"] > 0 and t["tokens_per_s"] > 0
    assert t["mfu"] is None  # no known peak for a CPU
    found = [f for _, _, fs in os.walk(t["trace_dir"]) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in found), found
    shares = t["ops"]["by_kind_share"]  # per-op events of the XLA:CPU worker threads
    assert shares["matmul"] > 0 and shares["fusion"] > 0 and sum(shares.values()) == pytest.approx(1)


def test_hlo_op_kinds_classify_fusions_by_what_they_compute():
    def f(a, b):
        return jnp.tanh(a @ b).T.copy() + 1.0, jnp.sum(jnp.exp(a), axis=0)

    a = jnp.ones((64, 32), jnp.float32)
    text = jax.jit(f).lower(a, a.T).compile().as_text()
    kinds = profiling.hlo_op_kinds(text)
    dots = [n for n, line in _instructions(text) if " dot(" in line or "dot" in _called_ops(text, line)]
    assert dots and all(kinds[n] == "matmul" for n in dots)
    assert "fusion" in kinds.values()  # the exp/sum and the tanh + 1 are no matmuls
    assert set(kinds.values()) <= {"matmul", "fusion", "copy/transpose", "collective", "fft", "other"}


def _instructions(text):
    for line in text.splitlines():
        head = line.strip().removeprefix("ROOT ")
        if " = " in head and line.startswith("  "):
            yield head.split(" = ")[0].lstrip("%"), line


def _called_ops(text, line):
    """The opcodes of the computation a fusion line calls (a plain reading of the HLO text)."""
    if "calls=" not in line:
        return ""
    name = line.split("calls=")[1].split(",")[0].split()[0].lstrip("%")
    body = text.split(f"{name} ", 1)[1].split("\n}", 1)[0] if f"{name} " in text else ""
    return body


def test_summarize_trace_splits_device_time_by_op_kind(tmp_path):
    # The shape of a GPU trace: a device process with an 'XLA Ops' line and a stream line.
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #7"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "dot.3", "dur": 60},
        {"ph": "X", "pid": 1, "tid": 1, "name": "loop_add_fusion.1", "dur": 30},
        {"ph": "X", "pid": 1, "tid": 1, "name": "all-reduce.2", "dur": 10},
        {"ph": "X", "pid": 1, "tid": 2, "name": "nvjet_gemm", "dur": 60},  # same work, other line
        {"ph": "X", "pid": 2, "tid": 9, "name": "dot.3", "dur": 1000},  # host: ignored
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = profiling.summarize_trace(str(tmp_path))
    assert out["source"] == "device" and out["total_us"] == 100
    assert out["by_kind_share"] == pytest.approx({"matmul": 0.6, "fusion": 0.3, "collective": 0.1})


def test_profile_steps_captures_a_trace_during_a_real_run(tmp_path):
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    config.train.profile_steps = "1:3"
    config.lock()
    summary = trainer.run(config, str(tmp_path / "run"), stop_at_step=3)  # no final evaluation
    assert summary["final_step"] == 3
    found = [f for _, _, fs in os.walk(tmp_path / "run" / "profile") for f in fs]
    assert any(f.endswith(".xplane.pb") for f in found), found
    config.unlock()
    config.train.profile_steps = "4:2"
    with pytest.raises(UserError, match="profile_steps"):
        trainer.validate(config)


def _cli(*args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = xla_flags_with_devices(devices)
    return subprocess.run([sys.executable, "-m", "mixers_jax.profile", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_aot_cli_on_16_fake_devices(tmp_path):
    proc = _cli(f"--config={config_path('transformer_clm', 'smoke')}", "--config.train.batch_size=16",
                "--what=aot", "--mesh=4x2x2", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The row's columns: remat policy, ..., the partitioner's involuntary rematerializations (0).
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("AOT row:"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:4] == ["transformer_clm-smoke", "transformer", "4x2x2", "none"], row
    assert cells[8] == "0", row
    assert "SPMD partitioner: 0 involuntary full rematerializations" in proc.stdout, proc.stdout
    with open(tmp_path / "profile.json", encoding="utf-8") as f:
        report = json.load(f)
    assert report["mesh"] == {"data": 4, "fsdp": 2, "tensor": 2}
    assert report["memory_per_device"]["params_bytes"] > 0
    assert report["involuntary_remats"] == 0 and report["involuntary_remat_ops"] == []


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--what=flame"], "unknown --what='flame'"),
        (["--what=memory", "--mesh=4x4x4"], "needs 64 devices, but 8 are available"),
        (["--what=memory", "--mesh=2x2"], "DATAxFSDPxTENSOR"),
        (["--what=aot"], "needs --mesh"),
        (["--what=memory", "--config.sharding=zero3"], "unknown sharding preset 'zero3'"),
        (["--what=memory", "--steps=0"], "--steps"),
        (["--what=memory", "--config.model.d_modle=3"], "unknown config key 'd_modle'"),
        (["--what=memory", "extra"], "unexpected arguments: extra"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, capsys, monkeypatch, args, pattern):
    """In this process (8 fake devices); the command's own entry point runs in the AOT test above."""
    import re

    from mixers_jax import profile

    argv = ["profile", f"--config={config_path('mixer_clm', 'smoke')}", f"--out={tmp_path}", *args]
    monkeypatch.setattr(sys, "argv", argv)  # where ml_collections finds the --config.* overrides
    status = exit_status(profile, argv)
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    assert "Traceback" not in err
