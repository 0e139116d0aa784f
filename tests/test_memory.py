"""Chunked memory models and their objectives (docs/memory_models.md): dependency structure by gradients,
batched == per-chunk loops, rmt == a Python loop over chunks, copy / chunked-CLM objectives, bad
input, and a blank-copy learning test."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mixers_jax import objectives
from mixers_jax.config import base_config
from mixers_jax.config import sub_model_config as sub_config
from mixers_jax.data import pipeline
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from mixers_jax.models.bottleneck import Bottleneck

V, N, S, D = 32, 8, 3, 32
PAD = 2


def mem_cfg(**overrides):
    cfg = base_config().model
    cfg.update({"kind": "memory", "vocab_size": V, "n_ctx": N, "d_model": D, "n_layers": 1,
                "chunks": S, "n_heads": 2})
    cfg.update(overrides)
    return cfg


def _init(model, length=S * N, seed=0):
    """The model's own initialisation (unsafe_rbg: XLA compiles it much faster than threefry)."""
    key = jax.random.key(seed, impl="unsafe_rbg")
    tokens = jnp.zeros((2, length), jnp.int32)
    return nn.meta.unbox(jax.jit(model.init)(key, tokens)["params"])


def _random_params(model, length=S * N, seed=0):
    """Generic N(0, 0.3²) values for every parameter (no init compile; structural tests only)."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((2, length), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), shapes)


def _tokens(seed, b=2, length=S * N):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, (b, length)), jnp.int32)


# Fixed slots with a mixer decoder (and a compress + bridge bottleneck); variable slots with
# transformers. Fixed slots with a transformer decoder (fill 1) are in the no-memory test.
MEMORY_VARIANTS = {
    "mixer_compressed_bridge": {"encoder": {"d_model": 16}, "compression": 2},
    "transformer_variable": {"encoder": {"kind": "transformer"}, "decoder": {"kind": "transformer"},
                             "memory_slots": "variable"},
}


def _reference_memory_logits(cfg, params, tokens):
    """Plain Python over chunks with standalone encoder / bottleneck / decoder (same params);
    variable slots: the decoder input [m_0..m_{c−1}, E t^(c)] really has length c + n."""
    s, n = cfg.chunks, cfg.n_ctx
    enc = build_model(sub_config(cfg, "encoder", n_ctx=n))
    dec_cfg = sub_config(cfg, "decoder", n_ctx=n + s)
    dec = build_model(dec_cfg)
    d_enc = sub_config(cfg, "encoder")["d_model"]
    bneck = Bottleneck(d_in=d_enc, compression=cfg.compression, d_out=dec_cfg["d_model"])
    fill = 1.0 if dec_cfg["kind"] == "transformer" else 0.0
    variable = cfg.memory_slots == "variable"
    pe, pd = {"params": params["encoder"]}, {"params": params["decoder"]}
    memories = []
    for c in range(s - 1):
        chunk = tokens[:, c * n:(c + 1) * n]
        h = enc.apply(pe, enc.apply(pe, chunk, method="embed_tokens"), method="hidden")
        memories.append(bneck.apply({"params": params.get("bottleneck", {})}, h[:, -1]))
    out = []
    for c in range(s):
        x_tok = dec.apply(pd, tokens[:, c * n:(c + 1) * n], method=lambda m, t: m.embed(t))
        b, d = x_tok.shape[0], dec_cfg["d_model"]
        slots = list(memories[:c]) if cfg.use_memory else []
        if not variable:
            slots += [jnp.full((b, d), fill)] * (s - len(slots))
        x = jnp.concatenate([jnp.stack(slots, 1), x_tok], axis=1) if slots else x_tok
        h = dec.apply(pd, x, method="hidden")
        out.append(dec.apply(pd, h[:, len(slots):], method="logits"))
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("name", list(MEMORY_VARIANTS))
def test_memory_equals_per_chunk_loop_and_dependencies_by_gradients(name):
    """The batched model equals a per-chunk Python loop. By gradients: output (c, t) depends on
    decoder token embeddings of chunk c at positions <= t only, and on encoder input embeddings of
    chunks < c only (never chunk c's own memory, never a later chunk)."""
    cfg = mem_cfg(**MEMORY_VARIANTS[name])
    model = build_model(cfg)
    params = _random_params(model)
    tokens = _tokens(1)

    @jax.jit
    def forward(params, tokens):
        def per_position(xe, xd):
            logits = model.apply({"params": params}, xe, xd,
                                 method=lambda m, xe, xd: m.decode(xd, m.encode(xe)))
            return logits.sum(axis=(0, 2)), logits  # one scalar per output position

        xe, xd = model.apply({"params": params}, tokens,
                             method=lambda m, t: (m.embed_encoder(t), m.embed_decoder(t)))
        jac, composed = jax.jacrev(per_position, argnums=(0, 1), has_aux=True)(xe, xd)
        return (model.apply({"params": params}, tokens), _reference_memory_logits(cfg, params, tokens),
                composed, jac)

    got, want, composed, (je, jd) = forward(params, tokens)
    assert got.shape == (2, S * N, V) and je.shape[:4] == (S * N, 2, S - 1, N)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(composed, got, rtol=1e-6, atol=1e-6)  # the methods make the model
    dep_e = np.abs(np.asarray(je)).sum(axis=(1, 4))  # [S·N, S−1, N]
    dep_d = np.abs(np.asarray(jd)).sum(axis=(1, 4))  # [S·N, S, N]
    for c in range(S):
        for t in range(N):
            o = c * N + t
            want_d = np.zeros((S, N), bool)
            want_d[c, : t + 1] = True
            assert np.all((dep_d[o] > 0) == want_d), (c, t, dep_d[o])
            want_e = np.zeros((S - 1, N), bool)
            want_e[:c] = True  # memories of earlier chunks; every position reaches the last one
            assert np.all((dep_e[o] > 0) == want_e), (c, t, dep_e[o])


def test_no_memory_control_ignores_earlier_chunks():
    """use_memory=False (mixer encoder, transformer decoder with fixed slots), through the real
    forward: changing a token of chunk 0 changes no later chunk's outputs (and chunk 0's only from
    that position on), the encoder gets no gradient, the parameter groups are those of the memory
    model, and the output equals the per-chunk loop with every slot holding the fill vector (1 for
    a transformer decoder). (With memory, the gradient test above shows the dependence on earlier
    chunks.)"""
    cfg = mem_cfg(use_memory=False, decoder={"kind": "transformer"})
    model = build_model(cfg)
    params = _random_params(model)
    with_memory = jax.eval_shape(lambda: _init(build_model(mem_cfg(decoder={"kind": "transformer"}))))
    assert jax.tree.structure(params) == jax.tree.structure(with_memory)
    tokens = _tokens(2)
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1 - 3) % (V - 3) + 3)  # chunk 0, position 3

    @jax.jit
    def run(params):
        def apply(p, t):
            return model.apply({"params": p}, t)

        grads = jax.grad(lambda p: apply(p, tokens)[:, N:].sum())(params)
        return (apply(params, tokens), apply(params, changed), grads,
                _reference_memory_logits(cfg, params, tokens))

    a, b, grads, want = jax.tree.map(np.asarray, run(params))
    np.testing.assert_allclose(a, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:N], b[:, 3:N])
    np.testing.assert_array_equal(a[:, N:], b[:, N:])
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["encoder"]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["decoder"]))


@pytest.mark.parametrize("kind,overwrite", [("mixer", True), ("transformer", False)])
def test_rmt_equals_python_loop_and_is_causal_across_chunks(kind, overwrite):
    cfg = mem_cfg(kind="rmt", decoder={"kind": kind}, rmt_overwrite=overwrite)
    model = build_model(cfg)
    params = _random_params(model, seed=5)
    assert set(params) == {"decoder"}
    tokens = _tokens(6)
    dec = build_model(sub_config(cfg, "decoder", n_ctx=N + 1))

    def loop(params, tokens):
        p = {"params": params["decoder"]}
        r = jnp.full((2, D), 1.0 if kind == "transformer" else 0.0)
        out = []
        for c in range(S):
            x = dec.apply(p, tokens[:, c * N:(c + 1) * N], method=lambda m, t: m.embed(t))
            if overwrite:
                x = x.at[:, -1].set(r)
            h = dec.apply(p, jnp.concatenate([r[:, None], x], axis=1), method="hidden")
            r = h[:, -1]
            out.append(dec.apply(p, h[:, 1:], method="logits"))
        return jnp.concatenate(out, axis=1)

    @jax.jit
    def forward(params, tokens):
        got = model.apply({"params": params}, tokens, rngs={"noise": jax.random.key(0)})
        x = model.apply({"params": params}, tokens, method="embed")
        jac = jax.jacrev(lambda x: model.apply({"params": params}, x, method="run").sum(axis=(0, 2)))
        return got, loop(params, tokens), jac(x)

    got, want, jac = forward(params, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    # Output (c, t) depends on chunk c's embeddings at positions <= t and on every earlier chunk
    # through the state (backprop through time); with overwrite, no last-token embedding is read.
    dep = np.abs(np.asarray(jac)).sum(axis=(1, 4))  # [S·N, S, N]
    for c in range(S):
        for t in range(N):
            want = np.zeros((S, N), bool)
            want[:c] = True
            want[c, : t + 1] = True
            if overwrite:
                want[:, -1] = False
            assert np.all((dep[c * N + t] > 0) == want), (c, t, dep[c * N + t])


# ------------------------------------------------------------------------------- objectives


def _batch(tokens, mask=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    nbytes = 1 + (tokens % 3) * mask.astype(jnp.int32)
    return {"tokens": tokens, "loss_mask": mask, "token_bytes": nbytes}


def test_copy_batch_labels_inputs_and_delimiter():
    rng = np.random.default_rng(0)
    t = rng.integers(3, V, (2, 16))
    mask = np.ones((2, 16), np.float32)
    mask[0, 6:] = 0.0  # row 0: a padded document
    t[0, 6:] = PAD
    batch = _batch(t, mask)
    cp = objectives.copy_batch(batch, "copy", PAD)
    bl = objectives.copy_batch(batch, "blank", PAD)
    for out in (cp, bl):
        np.testing.assert_array_equal(out["loss_mask"][:, :8], 0.0)
        np.testing.assert_array_equal(out["loss_mask"][:, 8:], mask[:, :8])  # pads stay ∅
        np.testing.assert_array_equal(out["targets"][:, 8:], t[:, :8])
        np.testing.assert_array_equal(out["tokens"][:, :8], t[:, :8])
        np.testing.assert_array_equal(out["token_bytes"][:, :8], 0)
        np.testing.assert_array_equal(out["token_bytes"][:, 8:], batch["token_bytes"][:, :8])
    np.testing.assert_array_equal(cp["tokens"][:, 8:], t[:, :8])
    np.testing.assert_array_equal(bl["tokens"][:, 8:], PAD)

    delim = objectives.copy_batch(batch, "blank", PAD, delimiter=17)
    changed_in = np.argwhere(np.asarray(delim["tokens"] != bl["tokens"])[1])[:, 0]
    np.testing.assert_array_equal(changed_in, [8, 9, 10])
    np.testing.assert_array_equal(delim["tokens"][:, 8:11], 17)
    changed_lab = np.argwhere(np.asarray(delim["loss_mask"] != bl["loss_mask"])[1])[:, 0]
    np.testing.assert_array_equal(changed_lab, [8, 9])  # position 7 was already ∅
    np.testing.assert_array_equal(delim["loss_mask"][:, 7:10], 0.0)
    np.testing.assert_array_equal(np.asarray(delim["loss_mask"])[:, 10:], np.asarray(bl["loss_mask"])[:, 10:])


def _fixed_apply(logits):
    return lambda params, tokens: logits


def _nll(logits, targets):
    logp = jax.nn.log_softmax(logits, -1)
    return -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]


def _ctx(kind="memory", **train):
    cfg = base_config()
    n_ctx = N if kind != "mixer" else S * N
    cfg.model.update({"kind": kind, "vocab_size": V, "n_ctx": n_ctx, "chunks": S})
    cfg.train.update(train)
    return objectives.ObjectiveContext(model=cfg.model, train=cfg.train, pad_id=PAD)


def test_chunked_clm_shift_and_divisor_with_an_empty_chunk():
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, V, (2, S * N))
    mask = np.ones((2, S * N), np.float32)
    mask[:, N + 1:2 * N] = 0.0  # chunk 1 has no targets (its first token is never one anyway)
    logits = jnp.asarray(rng.normal(size=(2, S * N, V)), jnp.float32)
    loss, sums = objectives.build("clm", _ctx())(_fixed_apply(logits), None, _batch(tokens, mask))
    nll = _nll(logits[:, :-1], tokens[:, 1:])  # [2, S·N−1]: output i predicts i+1
    per_chunk = []
    for c in (0, 2):
        rows = slice(c * N, c * N + N - 1)  # outputs 0..n−2 of chunk c
        per_chunk.append(nll[:, rows].mean())
    assert float(loss) == pytest.approx(sum(per_chunk) / S, rel=1e-6)  # divisor s = 3, not 2
    assert float(sums["tokens"]) == 2 * 2 * (N - 1)
    assert float(sums["nll"]) == pytest.approx(sum(nll[:, c * N:c * N + N - 1].sum() for c in (0, 2)),
                                               rel=1e-6)
    # Non-chunked kinds keep the plain shifted CLM.
    assert objectives.build("clm", _ctx("mixer")) is objectives.clm


def test_copy_objectives_chunked_and_full_context():
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, V, (2, S * N + N))  # 4 chunks: an even row
    ctx_mem, ctx_full = _ctx(chunks=4), _ctx("mixer")
    ctx_mem.model.chunks = 4
    ctx_full.model.n_ctx = 4 * N
    logits = jnp.asarray(rng.normal(size=tokens.shape + (V,)), jnp.float32)
    batch = _batch(tokens)
    seen = []

    def recording_apply(params, t):
        seen.append(t)
        return logits

    _, sums = objectives.build("blank_copy", ctx_mem)(recording_apply, None, batch)
    np.testing.assert_array_equal(seen[0][:, :2 * N], tokens[:, :2 * N])
    np.testing.assert_array_equal(seen[0][:, 2 * N:], PAD)
    assert float(sums["tokens"]) == 2 * 2 * (N - 1)  # chunks 2 and 3, within-chunk shift
    _, sums = objectives.build("copy", ctx_full)(_fixed_apply(logits), None, batch)
    assert float(sums["tokens"]) == 2 * 2 * N  # plain shift: output 2N−1 predicts label 2N
    want = _nll(logits[:, 2 * N - 1:-1], tokens[:, : 2 * N]).mean()
    loss, _ = objectives.build("copy", ctx_full)(_fixed_apply(logits), None, batch)
    assert float(loss) == pytest.approx(want, rel=1e-6)


def test_combined_is_clm_plus_copy_with_separate_sums():
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, V, (2, 4 * N))
    ctx = _ctx(copy_pass="blank", copy_delimiter=-1)
    ctx.model.chunks = 4
    table = jnp.asarray(rng.normal(size=(V, V)), jnp.float32)
    by_position = jnp.asarray(rng.normal(size=(4 * N, V)), jnp.float32)
    params = None

    def apply(p, t):  # a stand-in model whose logits depend on the input tokens and positions
        return table[t] + by_position[None]

    batch = _batch(tokens)
    loss, sums = objectives.build("combined", ctx)(apply, params, batch)
    l_clm, s_clm = objectives.build("clm", ctx)(apply, params, batch)
    l_copy, s_copy = objectives.build("blank_copy", ctx)(apply, params, batch)
    assert float(loss) == pytest.approx(float(l_clm + l_copy), rel=1e-5)
    for k in ("nll", "tokens", "correct", "bytes"):
        assert float(sums[k]) == pytest.approx(float(s_clm[k]), rel=1e-5)
        assert float(sums[f"copy_{k}"]) == pytest.approx(float(s_copy[k]), rel=1e-5)
    # With the delimiter, labels N/2 and N/2+1 (the first two of chunk 2) drop out: the first is
    # never a within-chunk target, so exactly one target less per row.
    ctx.train.copy_delimiter = 17
    _, sums_d = objectives.build("combined", ctx)(apply, params, batch)
    assert float(sums_d["copy_tokens"]) == float(s_copy["tokens"]) - 2


SHARED_VARIANTS = {
    **MEMORY_VARIANTS,
    "mixer_no_memory": {"use_memory": False},
}


@pytest.mark.parametrize("name,chunks,mode,delimiter", [
    ("mixer_compressed_bridge", 4, "blank", 17), ("transformer_variable", 3, "copy", -1),
    ("mixer_no_memory", 4, "blank", 17)])
def test_combined_shared_equals_two_full_passes(name, chunks, mode, delimiter):
    """train.combined_shared: the same loss, sums and gradients as the two full passes with fewer
    matmul FLOPs (chunks=3: the middle chunk straddles N/2, so only chunk 0 is shared);
    target_bytes counts the same."""
    from mixers_jax import profiling, target_bytes  # noqa: PLC0415 - only this test needs them

    cfg = mem_cfg(chunks=chunks, **SHARED_VARIANTS[name])
    model = build_model(cfg)
    params = _random_params(model, chunks * N, seed=1)
    tokens = np.array(_tokens(5, b=3, length=chunks * N))
    mask = np.ones(tokens.shape, np.float32)
    tokens[2, -5:], mask[2, -5:] = PAD, 0.0  # a padded row
    batch = _batch(tokens, mask)

    def apply(p, t, rngs=None, **inputs):
        return model.apply({"params": p}, t, rngs=rngs, **inputs)

    def objective(shared):
        full = base_config()
        full.model = cfg
        full.train.update(copy_pass=mode, copy_delimiter=delimiter, combined_shared=shared)
        ctx = objectives.ObjectiveContext(model=full.model, train=full.train, pad_id=PAD)
        fn = objectives.build("combined", ctx)
        grad_fn = jax.value_and_grad(lambda p: fn(apply, p, batch), has_aux=True)
        flops = profiling.count_flops(jax.make_jaxpr(grad_fn)(params))["total"]
        (loss, sums), grads = jax.jit(grad_fn)(params)
        weights = target_bytes.target_weights_fn(full, "combined", PAD)(batch)
        return loss, sums, grads, weights, flops

    loss0, sums0, grads0, weights0, flops0 = objective(False)
    loss1, sums1, grads1, weights1, flops1 = objective(True)
    assert flops1 < (0.85 if chunks == 4 else 0.95) * flops0
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-5)
    assert set(sums1) == set(sums0)
    for key in sums0:
        assert float(sums1[key]) == pytest.approx(float(sums0[key]), rel=1e-5), key
    assert float(sums1["copy_tokens"]) > 0
    np.testing.assert_array_equal(np.asarray(weights1), np.asarray(weights0))
    for g0, g1 in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=2e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads1["encoder"])) == (
        name != "mixer_no_memory")


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"chunks": 1}, r"model.chunks must be an integer >= 2"),
        ({"kind": "rmt", "chunks": 0}, r"model.chunks must be an integer >= 1"),
        ({"memory_slots": "variable"}, r"memory_slots='variable' needs a transformer decoder"),
        ({"memory_slots": "sometimes"}, r"model.memory_slots must be one of"),
        ({"encoder": {"kind": "memory"}}, r"model.encoder.kind must be one of"),
        ({"decoder": {"kind": "rmt"}}, r"model.decoder.kind must be one of"),
        ({"encoder": {"d_model": 30}, "compression": 4}, r"compression=4 must divide the encoder width 30"),
        ({"decoder": {"kind": "transformer", "d_model": 30}, "n_heads": 4}, r"model.decoder \(transformer"),
        ({"decoder": {"causal": False}}, r"model.decoder.causal must be True"),
        ({"encoder": {"position": N}}, r"model.encoder.position"),
        ({"embed_quant": "int4"}, r"model.embed_quant"),
    ],
)
def test_bad_memory_configs(overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        build_model(mem_cfg(**overrides))


def test_bad_objective_settings():
    odd = _ctx()
    odd.model.n_ctx, odd.model.chunks = 5, 3
    for name in ("copy", "blank_copy", "combined"):
        with pytest.raises(UserError, match="row length must be even"):
            objectives.build(name, odd)
    with pytest.raises(UserError, match="copy_delimiter must be a token id below"):
        objectives.build("combined", _ctx(copy_delimiter=V))
    with pytest.raises(UserError, match="copy_pass"):
        objectives.build("combined", _ctx(copy_pass="both"))


def test_pad_packing_rejects_rows_whose_last_chunk_is_always_pads():
    cfg = mem_cfg()
    docs = [np.arange(10), np.arange((S - 1) * N)]
    with pytest.raises(UserError, match=rf"longest training document has {(S - 1) * N} tokens.*= {S * N}"):
        pipeline.check_chunked_rows(cfg, docs, "pad")
    pipeline.check_chunked_rows(cfg, docs, "concat")  # packed rows are full
    pipeline.check_chunked_rows(cfg, docs + [np.arange((S - 1) * N + 1)], "pad")
    pipeline.check_chunked_rows(mem_cfg(kind="mixer"), docs, "pad")  # not a memory model


# ----------------------------------------------------------------------------------- learning


def _copy_model(use_memory):
    cfg = base_config()
    cfg.model.update({"kind": "memory", "vocab_size": V, "n_ctx": 8, "d_model": 64, "n_layers": 2,
                      "mlp_ratio": 2, "chunks": 2, "heads": 4, "use_memory": use_memory})
    return build_model(cfg.model), cfg


def _train_blank_copy(use_memory, params, steps=250, symbols=16, batch=32):
    """s=2 chunks of 8 random tokens from 16 symbols; blank copy of chunk 0 into chunk 1."""
    model, cfg = _copy_model(use_memory)
    loss_fn = objectives.build("blank_copy", objectives.ObjectiveContext(cfg.model, cfg.train, PAD))
    rng = np.random.default_rng(0)

    def sample():
        return _batch(rng.integers(3, 3 + symbols, (batch, 16)))

    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 4e-3, 20, steps))
    opt_state = opt.init(params)

    def apply(p, t):
        return model.apply({"params": p}, t)

    @jax.jit
    def step(params, opt_state, b):
        (_, sums), grads = jax.value_and_grad(lambda p: loss_fn(apply, p, b), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, sums

    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, sample())
    _, _, sums = step(params, opt_state, sample())  # a fresh batch, scored before the update
    return float(sums["correct"] / sums["tokens"])


def test_blank_copy_is_learned_with_memory_and_not_without():
    """≥ 0.9 token accuracy on the copied half with memory after 250 Adam steps; the no-memory
    control (the same initial parameters and budget) stays near chance (1/16), ≤ 0.2."""
    params = _init(_copy_model(True)[0], length=16)
    assert _train_blank_copy(True, params) >= 0.9
    assert _train_blank_copy(False, params) <= 0.2
