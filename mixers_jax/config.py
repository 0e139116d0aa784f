"""The configuration schema shared by every experiment family.

Every file in ``configs/`` starts from :func:`base_config` and overrides fields; presets are
selected with ``--config=configs/NAME.py:PRESET``. The ConfigDicts are *locked*, so an unknown key
given on the command line (``--config.model.d_modle=3``) fails loudly instead of being ignored.

Field reference (defaults follow docs/training.md):

model.kind              'mixer' | 'transformer' | composite kinds below | 'matcher' (an unmasked mixer
                        over n_ctx = pool + 1 embeddings: a query and its candidates)
model.vocab_size        tokenizer and embedding size (the tokenizer is trained to this size)
model.n_ctx             context length; a masked mixer's mixing matrices are n_ctx x n_ctx
model.d_model, n_layers width and depth
model.mlp_ratio         channel-MLP expansion (4 in every published model)
model.dtype             compute dtype: 'float32' | 'bfloat16' | 'float16' (params stay float32;
                        logits fp32; float16 trains with dynamic loss scaling,
                        docs/training.md#precision)
model.dropout_embed     dropout rate on the token embeddings in training (0 = off)
model.dropout_resid     dropout rate on each mixing / attention and MLP output before its
                        residual add, in training (0 = off)
model.dropout_attn      dropout rate on the attention probabilities in training (transformer
                        only; 0 = off)
model.reference         True: published numerics (LayerNorm eps 1e-5, exact-erf GELU, PyTorch init)
                        False: tanh-approximate GELU and N(0, 0.02) init, a faster variant
model.mixing            'flat' (one n x n matrix) | 'toeplitz' (W_ij = v_{i-j}) | structured recurrent
                        (docs/recurrent_mixers.md#structured-matrices): 'col' (A_ij = v_i d^(i-j))
                        | 'row' (A_ij = v_j d^(i-j)) | 'mixed'
                        (heads 0..H/2-1 column-repeat, the rest row-repeat; needs heads >= 2)
                        [mixer only]
model.block             'mixer' (mix first, GELU FFN; docs/masked_mixers.md#the-mixer-block)
                        | 'srm' (FFN first, SiLU, Kaiming init,
                        N(0,1) embedding; docs/recurrent_mixers.md#block-and-model)
model.decay             structured mixing: learnable decay d = clip(lam, 0.9, 1)^(512/n), lam
                        starting at 1 (gradient 1 on [0.9, 1]); False: d = 1
model.heads             0: one matrix shared by all features; H >= 1: per-head projections
                        (docs/masked_mixers.md#multi-head-mixing)
model.mixing_impl       'auto' (default: 'blocked' for causal k=1 mixing from n_ctx 128 on, else
                        'dense'; docs/mixing_performance.md) | 'dense' (masked n x n matmul; Toeplitz
                        and structured matrices materialised) | 'blocked' (lower block triangle
                        only) | 'pallas' (Pallas kernel, bias fused; interpret mode on CPU) |
                        'fft' (Toeplitz only). Same values and gradients up to float
                        reassociation; a resumed run may change it
model.expanded          mix -> GELU -> mix (factor 1, docs/masked_mixers.md#expanded-mixing)
model.layer_norm        False: norm-free ablation (mixer: both block LayerNorms; transformer: both
                        block norms and the final norm; docs/ablations.md)
model.residual          False: residual-free ablation (every block's residual additions)
model.mlp               the channel sublayer of every block: 'mlp' (default) | 'none' (no MLP and
                        no MLP norm) | 'attention' (transformer only: a second attention, with
                        its norm, in the MLP's place; docs/ablations.md)
model.tie_embeddings    share the input embedding with the LM head
model.scan_layers       True: the blocks run as one lax.scan over parameters stacked along a
                        leading 'layers' axis (blocks/... instead of block_0/..., block_1/...):
                        the same outputs for the same weights, a compile time that does not grow
                        with depth; False (default): one module per block
model.mask_grad         'masked' (default) | 'straight_through' (docs/training.md#causal-mask-gradient)
model.n_heads           attention heads of the transformer
model.rope_theta        RoPE base of the transformer (1e4)
model.n_kv_heads        transformer key/value heads (grouped-query attention; 0: n_heads)
model.head_dim          transformer per-head width (0: d_model / n_heads)
model.mlp_hidden        transformer SwiGLU width (0: mlp_ratio x d_model)
model.rms_eps           transformer RMSNorm epsilon (1e-6)
model.rope_scaling      'none' | 'linear' (frequencies / rope_factor) | 'llama3' (rope_factor,
                        rope_low_freq_factor, rope_high_freq_factor, rope_original_n_ctx);
                        docs/hf_import.md#rope-scaling
model.transformer       'llama' (RMSNorm, RoPE, SwiGLU, no biases) | 'gpt' (learned positions,
                        LayerNorm, GELU MLP, biases; docs/transformer_baseline.md)
model.hybrid            transformer only: 'none' (default) | 'series' (the transfixer: a masked
                        token mixing after attention in every block, x += Attn(N x); x += Mix(N' x);
                        x += MLP(N'' x)) | 'parallel' (beside attention, x += Attn(N x) + Mix(N x));
                        the mixing follows model.mixing, heads, mixing_impl, expanded
                        (docs/transformer_baseline.md#hybrids)
model.hybrid_mix_init   the hybrid mixing's init: 'mixer' (default: the mixer's own, reference=True
                        U(+-1/sqrt(n)) weights and bias) | 'small' (weights N(0, hybrid_mix_std^2),
                        bias 0) | 'zero' (the mixing's last linear map, or its output projection
                        when headed, starts at 0: a zero residual branch);
                        docs/transformer_baseline.md#hybrid-initialisation
model.hybrid_mix_std    sigma of hybrid_mix_init='small' (0.002)
model.embed_init        transformer token embedding: 'llama' N(0, 0.02^2) (default) | 'unit' N(0, 1)
                        (the mixer's)
model.bidirectional     mixer only: True = the bidirectional flat mixer (a forward stream masked
                        j <= i and a reverse stream masked j >= i+2, shared FFN, head(f + r);
                        docs/masked_mixers.md#bidirectional-mixer); no step form
model.parallel_mixers   mixer only: P >= 1 token mixings in every block, each with its own
                        LayerNorm and matrix, outputs summed: x <- x + sum_p Mix_p(LN1_p x)
                        (1, default: the plain block; docs/masked_mixers.md#parallel-mixers)
model.softmax_mixer     mixer only: True = softmax over the d features of the (summed) mixing
                        output before the residual add, x <- x + softmax(Mix(LN1 x))
                        (docs/masked_mixers.md#softmax-mixer)
model.position_channel  mixer only: True = before every block the last feature of x is
                        overwritten with the position i - n//2, in [-n/2, n/2); the width stays
                        d_model (docs/masked_mixers.md#positional-channel)
model.kernel            token-mixing taps k of flat mixing (docs/masked_mixers.md#kernel-mixing; 1 = plain)
model.causal            False: unmasked (bidirectional) mixing / attention, for encoders
model.encoder, decoder  sub-models of composite kinds: kind 'mixer' | 'transformer', d_model,
                        n_layers, mixing, heads, kernel, n_heads, mlp_ratio, causal; 0 / '' / -1 inherit the
                        top-level field (resolved by :func:`sub_model_config`). encoder.position: which position's hidden state is the
                        embedding (-1; -2 for encoders taken from causal LMs,
                        docs/autoencoders.md#embedding-position)
model.compression       c: the embedding is compressed d -> d/c (and back) by linear maps
                        (docs/bottleneck.md#compression-and-bridge)
model.expansion         autoencoder decoder input: 'repeat' | 'unroll'
                        (cyclic window, docs/autoencoders.md#unrolled-expansion)
model.injection         embedding_clm: 'token' | 'embedding' | 'add' (docs/embedding_lms.md#injection-modes)
model.chunks            memory models: s chunks of n_ctx tokens per row
                        (docs/memory_models.md#rows-and-chunks)
model.memory_slots      'fixed' (s slots, fill vector) | 'variable' (transformer decoders)
model.use_memory        False: the no-memory control (all slots hold the fill vector)
model.rmt_overwrite     rmt baseline: overwrite the last token embedding with the state
                        (docs/memory_models.md#recurrent-memory-baseline)
model.embed_quant       cast of the stored embedding at evaluation: none | float16 | bfloat16 |
                        float8_e4m3fn | float8_e5m2 | int8 (docs/bottleneck.md#quantization-formats)
model.embed_bits        bits per stored embedding number in the compression accounting
                        (docs/metrics.md#stored-embedding-accounting)
model.qat_noise         q > 0: uniform noise U(-q, q) added to the embedding in training
                        (docs/bottleneck.md#qat-noise)
data.split              hash (default: data.val_fraction held out by a hash of the text) | first
                        (the first data.test_documents documents of the source held out)
data.padding            'right' (default) | 'left': where the pads of a one-document row go
                        (packing=pad, retrieval rows); left puts them before the text, so a fixed
                        index from the row's end is the same token in every row
                        (docs/retrieval.md#padding-and-the-embedding-position)
retrieval.position      the embedding is the final hidden state of the token |p|-1 before the
                        row's last real token (p < 0; 0 = the default: -2 for mixers, whose last
                        position is never trained by clm, -1 for transformers). Pads never
                        contribute (left out of mixing and attention). Exact equality with the
                        unpadded row holds for right padding (every causal model) and for left-
                        padded transformers; a flat or Toeplitz mixer's weights are indexed by
                        absolute position, so its left-padded embedding depends on the row length
retrieval.pairs         'builtin' | paths of JSONL / Parquet pair files (query_field,
                        passage_field); held_out_fraction by a hash of the pair
retrieval.temperature, candidates  InfoNCE: cos similarity / tau, 1 positive + candidates-1
                        in-batch negatives (candidates = train.batch_size / train.grad_accum)
retrieval.pool_sizes    top-1 accuracy over pools of each size (held-out pairs), and BM25; empty:
                        32, 64, ..., 1024 up to the held-out size; a larger size is refused
retrieval.held_out_fraction  0: automatic (0.35 for the built-in pairs, 0.1 for pair files)
data.embedder           kind 'matcher': workdir of the frozen generative model whose embeddings of the
                        retrieval pairs the matcher reads (docs/search.md#direct-embedding-matching)
data.embedding_cache    file caching those embeddings ('' = <workdir>/embedding_cache.npz), keyed by
                        the model's fingerprint and the pair texts
train.objective         clm | autoencode | copy | blank_copy | combined | infonce | match (objectives.py);
                        copy_full / blank_copy_full: the copy ones on rows without pads only;
                        entropy_weighted_clm (embedding_clm): clm weighted by 1 − memory attribution
train.combined_shared   memory models, 'combined': the copy pass reuses the clm pass's memories of
                        the chunks both passes share and decodes only the chunks that hold copy
                        targets (the same loss and gradients up to float rounding, ~30% fewer
                        FLOPs at s = 4); False: two full passes
train.remat             rematerialisation (activation checkpointing) of every block in the backward
                        pass: 'none' (keep every activation) | 'block' (keep each block's input,
                        recompute the rest) | 'matmuls_saved' (also keep the outputs of matmuls
                        with a weight); same parameters and results, less memory, more compute
                        (docs/training.md#rematerialisation)
train.eval_objectives   objectives evaluated (logged as eval/<name>/...); empty: the training one
train.frozen            comma-separated top-level parameter groups that training leaves unchanged
train.init_from         workdir whose latest checkpoint initialises the subtrees in train.init_map
train.frozen_encoder_embedding  fresh_trainable (default; docs/objectives.md#frozen-encoders)
                        | pretrained_frozen |
                        pretrained_trainable: what the embedding of a loaded, frozen encoder does
train.stages            curriculum: a tuple of dicts (name, objective, steps, frozen, init_from,
                        init_map, lr, warmup_steps); one train command runs them all
train.on_divergence    what a non-finite loss, gradient norm, state or evaluation does: 'fail'
                        (default: the run stops with status 1) | 'record' (the run stops and
                        reports "diverged at step N" as its result, in the table and results.json,
                        status 0; for ablations, docs/ablations.md). Either way no non-finite state
                        is saved and the last good checkpoint is named.
train.recovery_runs     a run initialised from a memory model: 'ROLE=DIR,ROLE=DIR' naming the finished
                        runs of the two roles among nomem | frozen | trainable (encoder) that this
                        run is not; logs the memory-loss recovery ρ at each evaluation
                        (eval/memory_recovery, results.json; docs/ablations.md#memory-loss-recovery)
train.profile_steps     'a:b' captures a jax.profiler trace of steps a..b-1 into <workdir>/profile
mesh.data|fsdp|tensor   mesh axis sizes (-1 takes the remaining devices)
sharding                '3d' | 'dp' | 'fsdp' | 'tp' | 'fsdp_tp' (see README "Sharding strategies")
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from mixers_jax.errors import UserError


def field(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a ConfigDict, a dict (e.g. a loaded config.json) or an object with that
    attribute; ``default`` when it has no such key. The one config accessor of the package."""
    try:
        return cfg[key]
    except (KeyError, AttributeError, TypeError):
        return getattr(cfg, key, default)


CHUNKED_KINDS = ("memory", "rmt")  # model kinds whose data rows hold model.chunks chunks of n_ctx


def input_length(model_cfg: Any) -> int:
    """Tokens per data row: n_ctx, or chunks x n_ctx for the chunked memory models
    (docs/memory_models.md#rows-and-chunks)."""
    n = int(field(model_cfg, "n_ctx"))
    if field(model_cfg, "kind") in CHUNKED_KINDS:
        return n * int(field(model_cfg, "chunks"))
    return n


# Fields an encoder / decoder sub-config may set for itself, and the value that means "inherit the
# top-level field" (None: only an absent key inherits; ``causal`` is always the role's own).
SUB_MODEL_FIELDS = {"d_model": 0, "n_layers": 0, "mixing": "", "heads": -1, "kernel": 0,
                    "n_heads": 0, "mlp_ratio": 0, "causal": None}


def _inherits(value: Any, sentinel: Any) -> bool:
    return value is None or value == "" or (sentinel is not None and value == sentinel)


def sub_model_config(model_cfg: Any, role: str, n_ctx: int | None = None) -> dict:
    """The flat model config of a composite model's ``role`` ('encoder' | 'decoder') sub-model.

    Inheritance is explicit: the result starts from every top-level (non-dict) model field; each
    field of :data:`SUB_MODEL_FIELDS` that ``model.<role>`` sets to something other than its
    "inherit" value (0 for d_model / n_layers / kernel / n_heads / mlp_ratio, '' for mixing, -1 for heads;
    an absent key always inherits) overrides it; ``kind`` is ``model.<role>.kind`` ('mixer' when
    absent); ``n_ctx`` (the sub-model's own length, e.g. n_ctx + s for a memory decoder) replaces
    the top-level one when given. Other role fields (e.g. encoder.position) are not copied. Configs
    saved with these sentinel values (every existing workdir's config.json) resolve unchanged.
    """
    top = cfg_to_dict(model_cfg)
    role_cfg = top.get(role) or {}
    out = {k: v for k, v in top.items() if not isinstance(v, dict)}
    out["kind"] = role_cfg.get("kind", "mixer")
    for key, sentinel in SUB_MODEL_FIELDS.items():
        value = role_cfg.get(key)
        if not _inherits(value, sentinel):
            out[key] = value
    if n_ctx is not None:
        out["n_ctx"] = int(n_ctx)
    return out


def cfg_to_dict(cfg: Any) -> dict:
    """A ConfigDict (``to_dict``) or a mapping as a plain dict (nested ConfigDicts become dicts)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 42

    c.model = ml_collections.ConfigDict(
        dict(
            kind="mixer",
            vocab_size=4096,
            n_ctx=512,
            d_model=512,
            n_layers=8,
            mlp_ratio=4,
            dtype="float32",
            dropout_embed=0.0,
            dropout_resid=0.0,
            dropout_attn=0.0,
            reference=True,
            # masked-mixer fields
            mixing="flat",
            heads=0,
            mixing_impl="auto",
            expanded=False,
            layer_norm=True,  # ablation switches (mixer and transformer; docs/ablations.md)
            residual=True,
            mlp="mlp",
            tie_embeddings=False,
            scan_layers=False,
            mask_grad="masked",
            block="mixer",
            decay=True,
            kernel=1,
            causal=True,
            # transformer fields
            n_heads=4,
            rope_theta=10000.0,
            # Llama-family checkpoints (docs/hf_import.md); 0 / 'none' keep the baseline
            n_kv_heads=0,
            head_dim=0,
            mlp_hidden=0,
            rms_eps=1e-6,
            rope_scaling="none",
            rope_factor=1.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_n_ctx=8192,
            transformer="llama",
            hybrid="none",
            hybrid_mix_init="mixer",
            hybrid_mix_std=0.002,
            embed_init="llama",
            bidirectional=False,
            parallel_mixers=1,  # mixer block variants (docs/masked_mixers.md#other-block-variants)
            softmax_mixer=False,
            position_channel=False,
            # composite models (autoencoder, embedding_clm, memory, rmt): the encoder and the
            # decoder are each a mixer or a transformer; 0 / '' / -1 inherit the field above.
            encoder=ml_collections.ConfigDict(dict(
                kind="mixer", d_model=0, n_layers=0, mixing="", heads=-1, kernel=0, n_heads=0,
                mlp_ratio=0, causal=True, position=-1,
            )),
            decoder=ml_collections.ConfigDict(dict(
                kind="mixer", d_model=0, n_layers=0, mixing="", heads=-1, kernel=0, n_heads=0,
                mlp_ratio=0, causal=True,
            )),
            compression=1,
            expansion="repeat",
            injection="token",
            chunks=4,
            memory_slots="fixed",
            use_memory=True,
            rmt_overwrite=True,
            embed_quant="none",
            embed_bits=16,
            qat_noise=0.0,
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            # 'embedded' (prose shipped with the Python installation) or paths: a file, a folder,
            # a glob, or several of those separated by commas.
            source="embedded",
            format="auto",  # auto | text | jsonl | parquet
            text_field="text",  # JSONL / Parquet column holding the text
            val_fraction=0.05,  # share of documents (chosen by a hash of the text) held out
            split="hash",  # hash (val_fraction by a hash of the text) | first (test_documents)
            test_documents=0,  # split='first': the first N documents of the source are held out
            packing="concat",  # concat (stream + EOS, cut windows) | pad (one doc per row, truncated)
            padding="right",  # packing=pad and retrieval rows: right | left (pads before the text)
            tokenizer_model="",  # existing sentencepiece .model; empty: train one in the workdir
            tokenizer_max_chars=20_000_000,  # training text cap for the tokenizer trainer
            max_documents=0,  # 0: all
            # kind 'matcher': the trained run whose frozen model embeds the retrieval pairs, and
            # the cache of those embeddings ('' = <workdir>/embedding_cache.npz)
            embedder="",
            embedding_cache="",
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=16,  # global batch, in sequences, per optimizer step
            grad_accum=1,  # micro-batches per step (batch_size must divide by it)
            remat="none",  # none | block | matmuls_saved: activations recomputed in the backward pass
            lr=5e-4,
            warmup_steps=500,
            schedule="linear",  # linear | cosine (decay to 0 at the final step)
            clip_norm=1.0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            log_every=50,
            eval_every=500,
            eval_batches=8,
            checkpoint_every=500,
            keep_checkpoints=3,
            profile_steps="",  # 'a:b': jax.profiler trace of steps a..b-1 into <workdir>/profile
            objective="clm",
            eval_objectives=(),  # empty: (objective,)
            copy_pass="blank",  # the copy half of 'combined': 'blank' | 'copy'
            copy_delimiter=100,  # token written at N/2..N/2+2 of the copy pass; -1: none
            combined_shared=False,  # memory models: 'combined' shares the passes' common work
            frozen="",  # comma-separated parameter groups (top-level names) kept fixed
            init_from="",  # workdir whose latest checkpoint initialises parameters
            init_map="",  # 'target=source,...' subtrees copied from init_from ('.' = root)
            frozen_encoder_embedding="fresh_trainable",  # | pretrained_frozen | pretrained_trainable
            stages=(),  # curriculum: dicts with objective, steps, frozen, init_from, init_map, lr, ...
            on_divergence="fail",  # fail (exit 1) | record (the divergence step is the result; exit 0)
            recovery_runs="",  # 'nomem=DIR,trainable=DIR' (or frozen=): memory-loss recovery ρ
        )
    )

    # Retrieval (docs/retrieval.md): (query, passage) pairs, the InfoNCE objective, top-1 evaluation.
    c.retrieval = ml_collections.ConfigDict(
        dict(
            position=0,  # embedding position from the row's end; 0: -2 for mixers, -1 otherwise
            pairs="builtin",  # 'builtin' (docstring summaries of the embedded corpus) | JSONL/Parquet paths
            query_field="query",
            passage_field="passage",
            held_out_fraction=0.0,  # held out by a hash of the passage; 0: 0.35 builtin, 0.1 files
            max_pairs=0,  # 0: all
            temperature=0.02,  # InfoNCE temperature tau
            candidates=32,  # candidates per query in training: 1 positive + candidates-1 negatives
            pool_sizes=(),  # evaluation pools; empty: 32, 64, ..., 1024 up to the held-out size
            eval_queries=0,  # held-out queries scored per pool size; 0: all
        )
    )

    # Mesh axes ('data', 'fsdp', 'tensor'); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Sharding preset (mixers_jax/sharding.py PRESETS): '3d' (all rules, sizes from c.mesh),
    # 'dp', 'fsdp', 'tp', 'fsdp_tp' (tp degree from c.mesh.tensor).
    c.sharding = "3d"
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks a config so that unknown keys raise; returns it for chaining."""
    config.lock()
    return config


def apply_preset(
    config: ml_collections.ConfigDict, presets: dict, arg: str | None
) -> ml_collections.ConfigDict:
    """Applies ``presets[arg]`` (a dict of dotted keys) to ``config``.

    An empty ``arg`` keeps the defaults. An unknown preset raises ``ValueError`` naming the choices.
    """
    if arg:
        if arg not in presets:
            raise ValueError(f"unknown preset {arg!r}; choose one of: {', '.join(sorted(presets))}")
        set_fields(config, presets[arg], f"preset {arg!r}")
    return finalize(config)


def set_fields(config: ml_collections.ConfigDict, values: dict, what: str = "") -> None:
    """Sets ``values`` ({'model.d_model': 256, ...}, dotted keys) in ``config``; a key the schema
    lacks raises ``KeyError`` naming ``what`` sets it."""
    for dotted, value in values.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"{what or 'config'} sets unknown key {dotted!r}")
        node[leaf] = value


def family_config(family: str, presets: dict, arg: str | None, fields: dict | None = None,
                  default: str | None = None) -> ml_collections.ConfigDict:
    """The config of the experiment family of ``configs/<family>.py``: :func:`base_config` with
    the family's ``fields`` (dotted keys) set, named ``family`` (``family-arg`` with a preset),
    then preset ``arg`` (or ``default`` when none is given) applied; locked."""
    c = base_config()
    c.name = f"{family}-{arg}" if arg else family
    set_fields(c, fields or {}, f"family {family!r}")
    return apply_preset(c, presets, arg or default)


# Sizes and schedules shared by every family's `smoke` and `cpu` presets (embedded corpus).
SMOKE = {
    "model.n_ctx": 32, "model.d_model": 32, "model.n_layers": 2, "model.vocab_size": 320,
    "train.steps": 6, "train.batch_size": 8, "train.warmup_steps": 2, "train.lr": 1e-3,
    "train.log_every": 2, "train.eval_every": 3, "train.eval_batches": 2,
    "train.checkpoint_every": 3,
    "data.max_documents": 300, "data.tokenizer_max_chars": 300_000,
}
CPU = {
    "model.n_ctx": 128, "model.d_model": 256, "model.n_layers": 4, "model.vocab_size": 2048,
    "train.steps": 1100, "train.batch_size": 16, "train.warmup_steps": 100, "train.lr": 1e-3,
    "train.log_every": 50, "train.eval_every": 500, "train.eval_batches": 16,
    "train.checkpoint_every": 500,
    "data.tokenizer_max_chars": 4_000_000,
}
# The `cpu_small` causal-LM family (mixer_clm.py, transformer_clm.py, embedding_clm.py,
# information.py): the context of `cpu` (n128) at half its width and vocabulary and 800 steps, so
# that every causal-LM row of the results page (docs/results.md) runs in minutes on 2 cores.
CPU_SMALL = dict(CPU, **{
    "model.d_model": 128, "model.vocab_size": 1024, "train.steps": 800, "train.warmup_steps": 80,
    "train.eval_every": 400, "train.checkpoint_every": 400, "data.tokenizer_max_chars": 2_000_000,
})
# The better of two learning rates per kind in 300-step trials of CPU_SMALL (eval loss at step 300:
# mixer 3e-3 4.074, 8e-3 3.786; transformer 1.5e-3 4.083, 4e-3 4.524).
CPU_SMALL_LR = {"mixer": 8e-3, "transformer": 1.5e-3}
# The schedule of the published full-size runs (every family's paper-scale presets add their sizes,
# batch and learning rate): bf16 compute, 200k steps, 500 warmup steps, one document per row.
PAPER = {
    "model.dtype": "bfloat16", "train.steps": 200_000, "train.warmup_steps": 500,
    "train.log_every": 100, "train.eval_every": 5000, "train.eval_batches": 50,
    "train.checkpoint_every": 5000, "data.packing": "pad",
}


def clm_presets(kind: str) -> dict[str, dict]:
    """Presets shared by ``configs/mixer_clm.py`` and ``configs/transformer_clm.py``.

    smoke: seconds, for tests. cpu: minutes on 2 cores on the embedded corpus. cpu_small: the
    results page's causal LMs (:data:`CPU_SMALL`, learning rates :data:`CPU_SMALL_LR`).
    tinystories / fineweb: the published settings (docs/masked_mixers.md#published-configurations,
    docs/transformer_baseline.md#published-configurations); give the data with
    ``--config.data.source=...``. gpu_mfu: d1024 L16 n1024 bf16 for throughput measurements.
    """
    mixer = kind == "mixer"
    return {
        "smoke": dict(SMOKE, **{"model.n_heads": 2}),
        "cpu": dict(CPU, **{"model.n_heads": 4, "train.lr": 1e-3 if mixer else 5e-4}),
        "cpu_small": dict(CPU_SMALL, **{"model.n_heads": 4, "train.lr": CPU_SMALL_LR[kind]}),
        "tinystories": {
            **PAPER, "model.n_ctx": 512, "model.d_model": 512, "model.n_layers": 8,
            "model.vocab_size": 4096, "model.n_heads": 4, "train.batch_size": 16 if mixer else 32,
            "train.lr": 5e-4 if mixer else 2e-4,
        },
        "fineweb": {
            **PAPER, "model.n_ctx": 512, "model.d_model": 1024 if mixer else 512,
            "model.n_layers": 16, "model.vocab_size": 8000, "model.n_heads": 4,
            "train.batch_size": 128, "train.lr": 5e-4 if mixer else 2e-4,
        },
        "gpu_mfu": {
            "model.n_ctx": 1024, "model.d_model": 1024, "model.n_layers": 16,
            "model.vocab_size": 8000, "model.n_heads": 8, "model.dtype": "bfloat16",
            "train.steps": 300, "train.batch_size": 32, "train.warmup_steps": 50,
            "train.log_every": 20, "train.eval_every": 300, "train.checkpoint_every": 300,
        },
    }


def clm_config(kind: str, family: str, arg: str | None) -> ml_collections.ConfigDict:
    """A causal-LM config of ``kind`` ('mixer' | 'transformer') with preset ``arg`` applied."""
    fields = {"model.kind": kind, **({"train.lr": 2e-4} if kind == "transformer" else {})}
    return family_config(family, clm_presets(kind), arg, fields)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:preset]`` the way ``--config=`` does (for tools and tests)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        "mixers_jax_config_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg or None)
    except ValueError as e:
        raise UserError(str(e)) from None
