"""Hugging Face Llama import / export (mixers_jax/hf_llama.py, mixers_jax/hf.py) and tokenizer.json.

The fixtures in tests/fixtures/hf_llama were made once by the ``transformers`` library
(tests/fixtures/hf_llama/make_fixture.py): tiny random Llamas with their logits on a fixed input.
"""
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax import hf, hf_llama, sharding
from mixers_jax.config import base_config
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.data.tokenizer_json import JsonTokenizer
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.workdir import load_run
from tests_util import REPO, exit_status

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf_llama")
GQA, TIED = os.path.join(FIXTURES, "gqa"), os.path.join(FIXTURES, "tied")


def _model_cfg(fields: dict):
    cfg = base_config().model
    cfg.update(fields)
    return cfg


def _host(params):
    return jax.tree.map(np.asarray, jax.device_get(params))


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def gqa():
    return hf_llama.load_llama(GQA)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_logits_match_transformers(name, gqa):
    """GQA + llama3 RoPE + untied head, and tied + explicit head_dim + linear RoPE + θ 5e5."""
    d = os.path.join(FIXTURES, name)
    fields, params = gqa if name == "gqa" else hf_llama.load_llama(d)
    model = build_model(_model_cfg(fields))
    ids, ref = np.load(os.path.join(d, "input_ids.npy")), np.load(os.path.join(d, "logits.npy"))
    out = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    if name == "gqa":  # the KV-cache step (k, v with the 2 key/value heads) gives the same logits
        cache = model.init_cache(ids.shape[0])
        step_fn = jax.jit(lambda t, p, c: model.apply({"params": params}, t, p, c, method="step"))
        for p in range(ids.shape[1]):
            step, cache = step_fn(ids[:, p], jnp.int32(p), cache)
            np.testing.assert_allclose(np.asarray(step), ref[:, p], atol=1e-4, rtol=0)
        assert cache[0]["k"].shape[1] == 2


def test_grouped_query_attention_equals_repeated_heads(gqa):
    """GQA with G kv heads == full attention whose k/v kernels repeat each kv head H/G times."""
    fields, params = gqa
    full = dict(fields, n_kv_heads=0)
    rep = jax.tree.map(lambda a: a, params)
    for i in range(fields["n_layers"]):
        for k in ("k", "v"):
            kernel = params[f"block_{i}"]["attn"][k]["kernel"]
            rep[f"block_{i}"]["attn"][k] = {"kernel": jnp.repeat(kernel, 2, axis=1)}
    ids = np.load(os.path.join(GQA, "input_ids.npy"))
    a = jax.jit(build_model(_model_cfg(fields)).apply)({"params": params}, ids)
    b = jax.jit(build_model(_model_cfg(full)).apply)({"params": rep}, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_export_import_round_trip_is_bit_exact(gqa, tmp_path):
    fields, params = gqa
    cfg = _model_cfg(fields)
    one = tmp_path / "one"
    hf_llama.save_llama(params, cfg, str(one), eos_id=1, bos_id=0)
    _assert_equal(hf_llama.load_llama(str(one))[1], params)
    shards = tmp_path / "shards"  # at most ~20 KB per file: an index and several shards
    files = hf_llama.save_llama(params, cfg, str(shards), max_shard_bytes=20_000)
    assert os.path.basename(files[-2]) == hf_llama.INDEX_FILE and len(files) > 4
    again_fields, again = hf_llama.load_llama(str(shards))
    assert again_fields == fields
    _assert_equal(again, params)


def test_sharded_import_on_8_devices_equals_single_device(gqa, tmp_path):
    """fsdp 4 x tensor 2: every parameter is made from per-device slices; equal to one device."""
    fields, params = gqa
    shards = tmp_path / "shards"
    hf_llama.save_llama(params, _model_cfg(fields), str(shards), max_shard_bytes=20_000)
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, placed = hf_llama.load_llama(str(shards), mesh=mesh)
    _assert_equal(placed, params)
    mlp = placed["block_0"]["mlp"]["gate"]["kernel"]  # [d=32, F=40]: split 4 x 2
    assert len(mlp.sharding.device_set) == 8
    assert {s.data.shape for s in mlp.addressable_shards} == {(8, 20)}
    head = placed["head"]["kernel"]  # [32, 272]
    assert max(s.data.size for s in head.addressable_shards) == head.size // 8


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "imported")
    assert exit_status(hf, ["hf", "import", f"--checkpoint={GQA}", f"--workdir={out}"]) == 0
    return out


def test_imported_workdir_loads_and_exports(imported, gqa, tmp_path):
    run = load_run(imported)
    assert isinstance(run.tokenizer, JsonTokenizer) and run.step == 0
    _assert_equal(run.params, gqa[1])
    out = tmp_path / "exported"
    assert exit_status(hf, ["hf", "export", f"--workdir={imported}", f"--out={out}"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    _assert_equal(hf_llama.load_llama(str(out))[1], gqa[1])
    assert json.load(open(out / "config.json"))["num_key_value_heads"] == 2


def test_tokenizer_json_round_trip():
    tok = Tokenizer.load(os.path.join(GQA, "tokenizer.json"))
    assert isinstance(tok, JsonTokenizer) and tok.exact and tok.vocab_size == 272
    assert tok.pad_id == tok.eos_id == 1
    for text in ["The quick brown fox.", "  é中\x00\u2581 \r\n12345", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode())
        assert b"".join(tok.piece_bytes()[i] for i in ids) == text.encode()
    assert tok.encode_batch(["ab", "The"]) == [tok.encode("ab"), tok.encode("The")]
    assert [tok.piece_bytes()[int(i)] for i in tok.byte_token_ids()] == [bytes([b]) for b in range(256)]
    again = Tokenizer.from_serialized(tok.serialized())
    assert again.encode("mixers mix") == tok.encode("mixers mix")


def _bad_checkpoint(tmp_path, change) -> str:
    d = tmp_path / "bad"
    shutil.copytree(GQA, d)
    change(d)
    return str(d)


def _edit_config(**values):
    def change(d):
        cfg = json.load(open(d / "config.json"))
        cfg.update(values)
        json.dump(cfg, open(d / "config.json", "w"))
    return change


def _missing_shard(d):
    fields, params = hf_llama.load_llama(str(d))
    os.remove(d / "model.safetensors")
    hf_llama.save_llama(params, _model_cfg(fields), str(d), max_shard_bytes=20_000)
    index = json.load(open(d / hf_llama.INDEX_FILE))["weight_map"]
    os.remove(d / index["model.layers.0.mlp.up_proj.weight"])


def _other_tokenizer(d):
    spec = json.load(open(d / "tokenizer.json"))
    spec["model"]["vocab"].pop(max(spec["model"]["vocab"], key=spec["model"]["vocab"].get))
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    json.dump(spec, open(d / "tokenizer.json", "w"))


BAD = {
    "missing shard": (_missing_shard, r"shard .*model-000\d\d-of-000\d\d.safetensors listed in "
                                      r"model.safetensors.index.json is missing \(it holds model"),
    "not llama": (_edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                  "model_type 'gpt2' .* is not Llama-like"),
    "biases": (_edit_config(attention_bias=True), "attention_bias=True is not Llama-like"),
    "shape": (_edit_config(intermediate_size=48),
              r"tensor model.layers.0.mlp.gate_proj.weight in .*model.safetensors has shape "
              r"\[40, 32\], config.json gives \[48, 32\]"),
    "missing tensor": (_edit_config(num_hidden_layers=3),
                       "tensor model.layers.2.input_layernorm.weight is missing"),
    "tokenizer vocabulary": (_other_tokenizer,
                             "tokenizer .*tokenizer.json has 271 tokens but the model's vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_fail_in_one_line_writing_nothing(case, tmp_path, capsys):
    change, pattern = BAD[case]
    src = _bad_checkpoint(tmp_path, change)
    out = tmp_path / "workdir"
    assert exit_status(hf, ["hf", "import", f"--checkpoint={src}", f"--workdir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize("preset", ["pretrained_decoder", "pretrained_decoder_curriculum"])
def test_memory_model_with_the_imported_decoder(preset, imported, gqa):
    """configs/memory.py:pretrained_decoder=DIR: the decoder (shape, tokenizer, parameters) from the
    imported workdir, frozen with its embedding; the encoder and the memory bridge train (a
    gradient reaches the bridge). The curriculum's second stage trains everything."""
    from mixers_jax import curriculum, workdir
    from mixers_jax.config import load_config, set_fields

    config = load_config(os.path.join(REPO, "configs", "memory.py") + f":{preset}={imported}")
    assert config.model.decoder.kind == "transformer" and config.model.n_kv_heads == 2
    config.unlock()
    set_fields(config, {"model.n_ctx": 8, "model.chunks": 2, "model.encoder.d_model": 16,
                        "model.encoder.n_layers": 1})
    config.lock()
    stage_list = curriculum.stages(config)
    assert workdir.with_init_tokenizer(config, stage_list).data.tokenizer_model.endswith(
        "tokenizer.json")
    model = build_model(config.model)
    tokens = np.concatenate([np.load(os.path.join(GQA, "input_ids.npy"))] * 2, axis=1)[:, :16]
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(0)  # random values without compiling init
    params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), shapes)
    source, _ = workdir.init_source(stage_list[0])
    params = curriculum.merge_init_params(params, source, stage_list[0], imported)
    _assert_equal(params["decoder"], gqa[1])
    labels = [curriculum.param_labels(params, st.train) for st in stage_list]
    assert set(jax.tree.leaves(labels[0]["decoder"])) == {curriculum.FROZEN}
    assert set(jax.tree.leaves(labels[0]["bottleneck"])) == {curriculum.TRAINABLE}
    assert set(jax.tree.leaves(labels[-1]["decoder"])) == (
        {curriculum.TRAINABLE} if preset.endswith("curriculum") else {curriculum.FROZEN})

    if preset.endswith("curriculum"):
        return

    def loss(p):  # next-token loss of the last chunk, which reads chunk 0's memory
        logits = model.apply({"params": p}, tokens)[:, 8:15]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 9:16, None], -1))

    grads = jax.jit(jax.grad(loss))(params)
    assert params["bottleneck"]["bridge"]["kernel"].shape == (16, 32)
    assert float(jnp.abs(grads["bottleneck"]["bridge"]["kernel"]).max()) > 0


def test_random_checkpoint_imports(tmp_path):
    """The random checkpoints used to time imports: shards, a byte-level filler tokenizer."""
    d = str(tmp_path / "random")
    n = hf_llama.write_random_checkpoint(d, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                         mlp_hidden=24, vocab_size=300, max_shard_bytes=8_000)
    assert os.path.exists(os.path.join(d, hf_llama.INDEX_FILE))
    out = str(tmp_path / "workdir")
    result = hf_llama.import_workdir(d, out, n_ctx=32)
    assert result["params"] == n == 2 * 300 * 16 + 16 * (16 + 8 + 8 + 16) + 3 * 16 * 24 + 3 * 16
    tok = load_run(out).tokenizer
    assert tok.vocab_size == 300 and tok.exact and tok.decode(tok.encode("a\u00e9")) == "a\u00e9"
    assert exit_status(hf, ["hf", "convert"]) == 2


def test_sentencepiece_tokenizer_model_imports_and_exports(tmp_path):
    """A checkpoint whose tokenizer is a sentencepiece tokenizer.model (Llama 2 style)."""
    from run_util import sample_text

    d = str(tmp_path / "random")
    hf_llama.write_random_checkpoint(d, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                     mlp_hidden=24, vocab_size=384)
    os.remove(os.path.join(d, "tokenizer.json"))
    Tokenizer.train([sample_text()], 384, os.path.join(d, "tokenizer.model"))
    out = str(tmp_path / "workdir")
    hf_llama.import_workdir(d, out, n_ctx=32)
    assert isinstance(load_run(out).tokenizer, Tokenizer)
    files = hf_llama.export_workdir(out, str(tmp_path / "exported"))
    assert os.path.basename(files[-1]) == "tokenizer.model"


def test_data_refuses_a_tokenizer_json_of_another_vocabulary():
    from mixers_jax.data import pipeline

    data_cfg = {"tokenizer_model": os.path.join(GQA, "tokenizer.json")}
    with pytest.raises(UserError, match="tokenizer .*tokenizer.json has 272 pieces but "
                                        "model.vocab_size is 300"):
        pipeline.resolve_tokenizer(data_cfg, 300, None, [])
    tok, path, trained = pipeline.resolve_tokenizer(data_cfg, 272, None, [])
    assert isinstance(tok, JsonTokenizer) and not trained
