"""config.sub_model_config: explicit inheritance of encoder / decoder fields from the top-level
model fields; configs saved with the 0 / '' / -1 sentinels (every existing config.json) resolve
to the top-level values."""
import json

from mixers_jax.config import SUB_MODEL_FIELDS, base_config, sub_model_config


def _saved(cfg):
    """The model config as a workdir's config.json holds it (plain nested dicts)."""
    return json.loads(json.dumps(cfg.to_dict()))


def test_sentinels_inherit_every_top_level_field():
    m = base_config().model
    for source in (m, _saved(m)):
        for role in ("encoder", "decoder"):
            sub = sub_model_config(source, role)
            assert sub["kind"] == "mixer"
            for key in ("d_model", "n_layers", "mixing", "heads", "kernel", "n_heads", "mlp_ratio"):
                assert sub[key] == m[key], (role, key)
            assert "encoder" not in sub and "decoder" not in sub and "position" not in sub


def test_set_fields_override_and_heads_zero_is_a_value():
    m = base_config().model
    m.heads = 4
    m.encoder.update(dict(kind="transformer", d_model=48, n_layers=3, mixing="toeplitz", heads=0,
                          kernel=2, n_heads=6, mlp_ratio=2, causal=False))
    sub = sub_model_config(_saved(m), "encoder", n_ctx=7)
    assert {k: sub[k] for k in SUB_MODEL_FIELDS} == dict(
        d_model=48, n_layers=3, mixing="toeplitz", heads=0, kernel=2, n_heads=6, mlp_ratio=2,
        causal=False)
    assert sub["kind"] == "transformer" and sub["n_ctx"] == 7
    assert sub_model_config(m, "decoder")["heads"] == 4  # -1 inherits
    assert sub_model_config(m, "decoder")["n_ctx"] == m.n_ctx


def test_causal_is_the_roles_own_unless_absent():
    m = _saved(base_config().model)
    m["causal"] = False
    assert sub_model_config(m, "decoder")["causal"] is True  # the role's default True
    del m["decoder"]["causal"]
    assert sub_model_config(m, "decoder")["causal"] is False  # absent: inherited


def test_configs_saved_before_a_field_existed_inherit_it():
    m = _saved(base_config().model)
    m["mlp_ratio"] = 3
    del m["decoder"]["mlp_ratio"]  # a config.json written before per-role MLP widths
    assert sub_model_config(m, "decoder")["mlp_ratio"] == 3
