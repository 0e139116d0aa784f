"""Counting the SPMD partitioner's "involuntary full rematerialization" warnings (compile_log.py)
on 8 fake CPU devices: a deliberately bad sharding is counted, good ones (the tiny memory model's
and embedding-augmented LM's train steps on 2x2x2) give 0, and a count that cannot be known is None,
not 0."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mixers_jax import compile_log, profiling, sharding
from mixers_jax.config import load_config
from mixers_jax.models import layers
from tests_util import config_path


def _bad_lookup():
    """A table split along its width and rows wanted split along the batch: the partitioner can
    only replicate the gathered rows and cut them again. Returns (jitted fn, abstract args)."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    table = jax.ShapeDtypeStruct((96, 24), jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp")))
    ids = jax.ShapeDtypeStruct((8, 12), jnp.int32, sharding=sharding.batch_sharding(mesh))
    fn = jax.jit(lambda t, i: jnp.take(t, i, axis=0), out_shardings=sharding.batch_sharding(mesh))
    return fn, (table, ids)


def test_a_bad_sharding_is_counted_and_echoed(capfd):
    fn, args = _bad_lookup()
    _, log = profiling.compile_logged(fn, *args)
    assert log.counted, "the compile came from the persistent cache; nothing to count"
    assert log.involuntary_remats >= 1, log.text
    assert any(op.startswith("gather f32[") for op in log.remat_operations()), log.text
    # The captured warnings still reach the real stderr.
    assert compile_log.INVOLUNTARY_REMAT in capfd.readouterr().err


def test_no_compile_or_silenced_warnings_give_no_count(monkeypatch):
    fn, args = _bad_lookup()
    first = profiling.compile_logged(fn, *args)[1]
    # The same program again: JAX answers from memory or the tests' persistent cache, XLA compiles
    # nothing and logs nothing, and that is not a count of 0.
    _, again = profiling.compile_logged(fn, *args)
    assert again.involuntary_remats is None and not again.counted, (first, again)
    with compile_log.capture() as idle:
        pass
    assert idle.compiles == 0 and idle.involuntary_remats is None
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    fn, args = _bad_lookup()
    with compile_log.capture() as log:
        jax.jit(lambda t, i: jnp.take(t, i + 1, axis=0),
                out_shardings=sharding.batch_sharding(fn_mesh(args))).lower(*args).compile()
    assert log.compiles and log.warnings_suppressed and log.involuntary_remats is None


def fn_mesh(args):
    return args[1].sharding.mesh


def _step_log(family, vocab):
    """The CompileLog of the tiny ``family`` smoke model's train step on 2x2x2, with one block per
    stack and a vocabulary no other test uses, so that it is compiled here and not read from the
    tests' cache: every block is the same code and shards the same way, so a second one only
    lengthens the compile."""
    config = load_config(config_path(family, "smoke"))
    config.unlock()
    config.model.vocab_size = vocab
    config.model.n_layers = 1
    config.model.encoder.n_layers = 1  # one encoder block too (a preset may set its own depth)
    config.lock()
    steps, state, batch = profiling.setup(config, "2x2x2")
    _, log = profiling.compile_logged(steps.train_step, state, batch)
    assert log.counted
    return log


def test_the_tiny_memory_model_step_has_none_and_the_old_lookup_had_some(monkeypatch):
    assert _step_log("memory", vocab=328).involuntary_remats == 0

    def width_split_lookup(self, tokens_BxN):  # the lookup before the fix: no constraint
        return jnp.take(self.embedding, tokens_BxN, axis=0).astype(self.dtype)

    monkeypatch.setattr(layers.Embed, "__call__", width_split_lookup)
    log = _step_log("memory", vocab=336)
    assert log.involuntary_remats >= 2, log.text  # the lookup and its gradient's scatter
    assert any(op.startswith("gather ") for op in log.remat_operations()), log.text


def test_the_bottleneck_reads_whole_kernels_and_leaves_no_remat(monkeypatch):
    assert _step_log("embedding_clm", vocab=344).involuntary_remats == 0
    # Its linears without the explicit kernel gather: the partitioner splits the compressed vector
    # along its width to meet the width-split 'up' kernel, and can only do so by replicating it.
    linear = layers.Linear
    monkeypatch.setattr(layers, "Linear", lambda *a, gather_kernel=False, **k: linear(*a, **k))
    log = _step_log("embedding_clm", vocab=352)
    assert log.involuntary_remats >= 1, log.text
    assert any(op.startswith("sharding_constraint") for op in log.remat_operations()), log.text
