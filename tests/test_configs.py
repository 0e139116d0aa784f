"""Every config file and preset builds (shapes only, no allocation) and passes validation."""
import glob
import os

import jax
import pytest

from mixers_jax import curriculum, trainer
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, example_input
from tests_util import CONFIGS, config_path


def _all_specs():
    specs = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        cfg_module = {}
        exec(compile(open(path).read(), path, "exec"), cfg_module)
        for preset in (None, *cfg_module.get("PRESETS", ())):
            specs.append((name, preset))
    return specs


SPECS = _all_specs()


def test_config_files_exist():
    names = {name for name, _ in SPECS}
    assert {"mixer_clm", "transformer_clm", "recurrent", "autoencoder", "embedding_clm",
            "information", "memory"} <= names


@pytest.mark.parametrize("name,preset", SPECS, ids=[f"{n}:{p or 'default'}" for n, p in SPECS])
def test_every_config_builds(name, preset):
    config = load_config(config_path(name, preset))
    trainer.validate(config)
    assert curriculum.stages(config)[-1].end > 0
    model = build_model(config.model)
    example = example_input(config.model)  # tokens, or the matcher's embeddings
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct(example.shape, example.dtype))
    n_params = sum(x.size for x in jax.tree.leaves(variables))
    embedding = 0 if config.model.kind == "matcher" else config.model.vocab_size
    assert n_params > max(embedding, config.model.d_model) * config.model.d_model
    with pytest.raises(AttributeError):  # configs are locked: typos cannot slip through
        config.model.d_modle = 3


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="unknown preset 'nope'; choose one of: .*smoke"):
        load_config(config_path("mixer_clm", "nope"))
