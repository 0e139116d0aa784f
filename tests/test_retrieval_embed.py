"""Embeddings from final hidden states: padding, the embedding position, pads left out, Embedder."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax.config import base_config
from mixers_jax.data.pipeline import pack_rows, pad_rows
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.models.embedding import embed_rows, embedding_index, embedding_position
from mixers_jax.retrieval.embed import Embedder
from run_util import make_workdir

N = 16


def _model(kind, **over):
    c = base_config()
    c.model.update(dict(kind=kind, vocab_size=64, n_ctx=N, d_model=16, n_layers=2, n_heads=2), **over)
    model = build_model(c.model)
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, N), jnp.int32))["params"]
    return c, model, params


def _apply(model):
    """``model.apply`` with the parameters first, jitted: one compile per input shape and method
    instead of one per operation (the same math; embed_rows itself still runs as written)."""
    @functools.partial(jax.jit, static_argnames="method")
    def apply(p, *args, method=None):
        return model.apply({"params": p}, *args, method=method)

    return apply


def _doc(length, seed=0):
    return np.random.RandomState(seed).randint(3, 64, size=length).astype(np.int32)


def test_padding_layout_and_right_unchanged():
    docs = [_doc(5), _doc(20, 1)]
    rows, lengths = pad_rows(docs, n_ctx=8, pad_id=2, padding="left")
    assert rows[0].tolist() == [2, 2, 2] + docs[0].tolist() and rows[1].tolist() == docs[1][:8].tolist()
    assert lengths.tolist() == [5, 8]
    right = pack_rows(docs, n_ctx=8, packing="pad", pad_id=2)
    assert right[0].tolist() == docs[0].tolist() + [2, 2, 2]
    with pytest.raises(UserError, match="packing='pad'"):
        pack_rows(docs, n_ctx=8, packing="concat", pad_id=2, padding="left")


def test_embedding_index_means_the_same_token():
    lengths = jnp.asarray([10, 3, 1])
    assert embedding_index(lengths, N, -2, "left").tolist() == [N - 2, N - 2, N - 1]
    assert embedding_index(lengths, N, -2, "right").tolist() == [8, 1, 0]
    c = base_config()
    assert embedding_position(c) == -2
    c.model.kind = "transformer"
    assert embedding_position(c) == -1
    c.retrieval.position = -3
    assert embedding_position(c) == -3


@pytest.mark.parametrize("transformer", ["llama", "gpt"])
def test_left_padded_transformer_equals_unpadded(transformer):
    """Exact where the model is position-relative: the transformer, positions from the first real token."""
    _, model, params = _model("transformer", transformer=transformer)
    apply = _apply(model)
    for length in (1, 5, 11):
        doc = _doc(length, length)
        unpadded = apply(params, jnp.asarray(doc[None]), method="final_hidden")
        for padding in ("left", "right"):
            rows, lengths = pad_rows([doc], n_ctx=N, pad_id=2, padding=padding)
            for position in (-1, -2):
                emb = embed_rows(apply, params, jnp.asarray(rows), jnp.asarray(lengths), position,
                                 padding)
                want = unpadded[0, max(length + position, 0)]
                np.testing.assert_allclose(np.asarray(emb[0]), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mixing", ["flat", "toeplitz"])
def test_right_padded_mixer_equals_the_row_without_pads(mixing):
    """Right padding with each row's own index is exact for every causal model: the embedding is
    the hidden state of the same tokens followed by anything (here: other text instead of pads)."""
    _, model, params = _model("mixer", mixing=mixing)
    doc = _doc(9, 3)
    rows, lengths = pad_rows([doc], n_ctx=N, pad_id=2, padding="right")
    full = np.concatenate([doc, _doc(N - 9, 4)])[None]
    apply = _apply(model)
    h = apply(params, jnp.asarray(full), method="final_hidden")
    emb = embed_rows(apply, params, jnp.asarray(rows), jnp.asarray(lengths), -2, "right")
    np.testing.assert_allclose(np.asarray(emb[0]), np.asarray(h[0, 7]), atol=1e-5)


def test_left_padded_mixer_ignores_what_the_pads_are():
    """Pads are left out of the mixing: the embedding does not depend on the pad tokens (the flat
    mixer's weights are indexed by absolute position, so it does depend on the row length)."""
    _, model, params = _model("mixer", heads=2, expanded=True)
    doc = _doc(6, 5)
    rows, lengths = pad_rows([doc], n_ctx=N, pad_id=2, padding="left")
    noisy = rows.copy()
    noisy[0, : N - 6] = _doc(N - 6, 6)
    apply = _apply(model)
    a = embed_rows(apply, params, jnp.asarray(rows), jnp.asarray(lengths), -2, "left")
    b = embed_rows(apply, params, jnp.asarray(noisy), jnp.asarray(lengths), -2, "left")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = apply(params, jnp.asarray(noisy), method="final_hidden")[:, N - 2]
    assert float(jnp.abs(plain - a).max()) > 1e-3  # without the mask the pads would count


def test_final_hidden_without_mask_is_the_lm_hidden_state():
    for kind in ("mixer", "transformer"):
        _, model, params = _model(kind)
        tokens = jnp.asarray(_doc(N, 7)[None])
        h = model.apply({"params": params}, tokens, method="final_hidden")
        logits = model.apply({"params": params}, h, method="logits")
        np.testing.assert_array_equal(np.asarray(logits),
                                      np.asarray(model.apply({"params": params}, tokens)))
        ones = model.apply({"params": params}, tokens, jnp.ones((1, N)), method="final_hidden")
        np.testing.assert_allclose(np.asarray(ones), np.asarray(h), atol=1e-5)


def test_embedder_batches_and_bad_input(tmp_path):
    workdir = make_workdir(str(tmp_path / "run"), kind="transformer")
    texts = ["import json", "the os module", "regular expressions", "a path", "x"]
    one_batch = Embedder.from_workdir(workdir, batch_size=8)
    small = Embedder.from_workdir(workdir, batch_size=2, padding="left")
    assert (one_batch.padding, one_batch.position, one_batch.dim) == ("right", -1, 32)
    a = one_batch.embed(texts)
    b = small.embed(texts)
    assert a.shape == (5, 32) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=2e-5)  # left = right padding for a transformer
    unit = one_batch.embed(texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(UserError, match="empty text"):
        one_batch.embed(["fine", ""])
    with pytest.raises(UserError, match="padding"):
        Embedder.from_workdir(workdir, padding="middle")
    # a run that read text with another run's tokenizer (init_from) has none of its own: the
    # checkpoint's copy is used
    os.remove(os.path.join(workdir, "tokenizer.model"))
    np.testing.assert_array_equal(Embedder.from_workdir(workdir, batch_size=8).embed(texts), a)
