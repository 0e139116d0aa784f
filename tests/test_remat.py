"""Rematerialisation policies (train.remat) on 8 fake CPU devices (a 2x2x2 mesh): the same
parameter tree, loss and gradients as 'none', and fewer temporaries in the compiled step."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mixers_jax import objectives, profiling, sharding
from mixers_jax import steps as steps_lib
from mixers_jax.config import input_length, load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.models.layers import REMAT_POLICIES
from tests_util import config_path

# (id, model overrides on configs/memory.py:smoke; nested dicts update model.encoder / decoder):
# mixer encoder and decoder with dropout (the recomputed forward must draw the same masks), and
# transformer encoder and decoder with variable slots (blocks called with a mask and positions).
# One block each in the encoder and the decoder (every block is the same code; a second one only
# doubles the compile): two rematerialised blocks per model, one per stack. The objective is clm:
# the preset's combined objective is clm plus a second call of the same model on the copy rows,
# which passes through the same rematerialised blocks and only doubles the gradient's compile.
MODELS = [
    ("memory_mixer_dropout", {"dropout_resid": 0.1, "dropout_embed": 0.1, "n_layers": 1}),
    ("memory_transformer_variable", {"encoder": {"kind": "transformer"},
                                     "decoder": {"kind": "transformer"},
                                     "memory_slots": "variable", "n_layers": 1}),
]


def _config(model, remat):
    config = load_config(config_path("memory", "smoke"))
    config.unlock()
    for key, value in model.items():
        if isinstance(value, dict):
            config.model[key].update(value)
        else:
            config.model[key] = value
    config.train.remat = remat
    config.train.objective = "clm"
    config.lock()
    return config


def _batch(config):
    rng = np.random.default_rng(0)
    rows, n = int(config.train.batch_size), input_length(config.model)
    return {"tokens": rng.integers(3, config.model.vocab_size, (rows, n), dtype=np.int32),
            "loss_mask": np.ones((rows, n), np.float32),
            "token_bytes": np.full((rows, n), 2, np.int32)}


def _loss_and_grads(config, mesh, params=None):
    """The clm objective's loss and gradients at ``params`` (default: the config's own
    initialisation), sharded on ``mesh`` as training runs them, with dropout on (a fixed key).
    Returns (loss, gradients, params)."""
    steps = steps_lib.build_steps(config, mesh)
    if params is None:
        params = steps.init(jax.random.key(0)).params
    rules = sharding.activation_rules(sharding.resolve(config)[1], mesh,
                                      steps_lib.activation_dims(config.model))
    loss_fn = objectives.build(config.train.objective,
                               objectives.ObjectiveContext(config.model, config.train))

    def apply_fn(p, tokens, rngs=None):
        with sharding.activation_context(mesh, rules):
            return steps.model.apply({"params": p}, tokens,
                                     rngs={"dropout": jax.random.key(7), "noise": jax.random.key(8)})

    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(apply_fn, p, b)[0]))
    loss, grads = grad_fn(params, sharding.global_batch(_batch(config), mesh))
    return float(loss), jax.tree.map(np.asarray, grads), params


@pytest.mark.parametrize("name,model", MODELS, ids=[m[0] for m in MODELS])
def test_remat_policies_give_the_same_loss_and_gradients(name, model):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ref_loss, ref_grads, params = _loss_and_grads(_config(model, "none"), mesh)
    assert np.isfinite(ref_loss)
    for policy in REMAT_POLICIES[1:]:
        # At the reference's parameters: every policy initialises the same tree (the test below),
        # and one init compile instead of three keeps this test's time on the gradients.
        loss, grads, _ = _loss_and_grads(_config(model, policy), mesh, params)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads), policy
        assert loss == pytest.approx(ref_loss, rel=1e-6), policy
        for path, g, r in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path[0])}")


def test_remat_keeps_the_parameter_tree_and_rematerialises_every_block():
    config = _config({}, "none")
    tokens = np.zeros((1, input_length(config.model)), np.int32)
    shapes = {}
    for policy in REMAT_POLICIES:
        model = build_model(config.model, remat=policy)
        boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        shapes[policy] = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(boxed))
        jaxpr = str(jax.make_jaxpr(jax.grad(
            lambda p: model.apply({"params": p}, tokens).sum()))(nn.meta.unbox(boxed)))
        # One remat region per block of the encoder and the decoder (2 + 2 layers), none without.
        expected = 0 if policy == "none" else 2 * config.model.n_layers
        assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= expected, policy
        if policy == "none":
            assert "checkpoint[" not in jaxpr and "remat" not in jaxpr
    assert shapes["block"] == shapes["none"] == shapes["matmuls_saved"]


def test_remat_lowers_the_compiled_steps_temporaries():
    """A mixer deep and wide enough (for its vocabulary) that the blocks' activations dominate the
    step's temporaries, on 2x2x2; each block's recomputation waits for its output's cotangent, so
    even XLA's CPU scheduler cannot keep every block's activations alive at once."""
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    # Four blocks and a batch of 64 rows: 'block' keeps ~0.51 of 'none's temporaries and
    # 'matmuls_saved' ~0.52 (six blocks of d 64 at 16 rows: ~0.49 and ~0.53, with half again
    # the compile time).
    config.model.update(dict(n_layers=4, d_model=32, n_ctx=64, vocab_size=72))
    config.train.batch_size = 64
    temps = {}
    for policy in REMAT_POLICIES:
        config.train.remat = policy
        steps, state, batch = profiling.setup(config, "2x2x2")
        compiled = steps.train_step.lower(state, batch).compile()
        temps[policy] = profiling.memory_report(compiled)["temp_size_in_bytes"]
    assert temps["block"] < 0.6 * temps["none"], temps
    assert temps["block"] < temps["matmuls_saved"] < temps["none"], temps


def test_bad_remat_policy_is_a_user_error():
    from mixers_jax import trainer

    config = _config({}, "everything")
    with pytest.raises(UserError, match="train.remat must be one of"):
        trainer.validate(config)
    with pytest.raises(UserError, match="train.remat must be one of"):
        build_model(config.model, remat="everything")
