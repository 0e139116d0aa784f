"""configs/recurrent.py: the published SRM presets have the published shapes
(docs/recurrent_mixers.md#published-configurations)."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from mixers_jax.config import load_config
from mixers_jax.models import build_model
from tests_util import config_path


@pytest.mark.parametrize("preset,n", [("fineweb_n512", 512), ("fineweb_n1024", 1024)])
def test_published_presets(preset, n):
    config = load_config(config_path("recurrent", preset))
    m = config.model
    assert (m.d_model, m.n_layers, m.heads, m.n_ctx, m.mixing, m.block) == (1024, 16, 4, n, "mixed", "srm")
    assert (config.train.lr, config.train.warmup_steps) == (5e-4, 50)
    shapes = nn.meta.unbox(jax.eval_shape(build_model(m).init, jax.random.key(0),
                                          jax.ShapeDtypeStruct((1, n), jnp.int32))["params"])
    mix = shapes["block_0"]["mix"]
    assert mix["v"].shape == (4, n) and mix["c"].shape == (4, n) and mix["lam"].shape == (4,)
    assert mix["proj"]["kernel"].shape == (1024, 4, 256) and mix["out"]["kernel"].shape == (4, 256, 1024)
    assert shapes["block_0"]["ffn"]["fc1"]["kernel"].shape == (1024, 4096)
    # recurrent generation state: d numbers per layer (float32), whatever the context length
    cache = build_model(m).init_cache(1, "recurrent")
    assert sum(x.size for x in jax.tree.leaves(cache)) == 16 * 1024
