"""Model hyper-parameters, built once from ``config.model`` and validated there.

``mixer_spec(cfg)`` / ``transformer_spec(cfg)`` read a flat model config (a ConfigDict, or a dict
such as :func:`mixers_jax.config.sub_model_config` returns), check every field (bad values raise
``UserError`` naming ``model.<field>``) and return a frozen :class:`MixerSpec` /
:class:`TransformerSpec`. The Flax modules take the spec as their one hyper-parameter field and pass
it down unchanged, so no field is re-declared on the modules below.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mixers_jax.config import field
from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.mixing import MixingSpec, check_mixing, resolve_impl

DTYPES = ("float32", "bfloat16", "float16")
BLOCKS = ("mixer", "srm")
TRANSFORMERS = ("llama", "gpt")
DROPOUTS = ("dropout_embed", "dropout_resid", "dropout_attn")  # dropout_attn: transformer only
# The channel sublayer of a block (docs/ablations.md): the MLP, none, or (transformer only) a second
# attention in the MLP's place.
MLPS = ("mlp", "none", "attention")
# Transformer-mixer hybrids (docs/transformer_baseline.md#hybrids): 'series' (the transfixer) adds a
# masked token mixing after attention in every block, 'parallel' puts it beside attention.
HYBRIDS = ("none", "series", "parallel")
ROPE_SCALINGS = ("none", "linear", "llama3")  # RoPE frequency scaling of Llama-family checkpoints
# The hybrid mixing's initialisation (docs/transformer_baseline.md#hybrid-initialisation): 'mixer'
# (the mixer's own, default), 'small' (weights N(0, hybrid_mix_std²), zero bias), 'zero' (the
# mixing's last linear map starts at zero); the MixingSpec.init each one sets.
HYBRID_MIX_INITS = {"mixer": "op", "small": "small", "zero": "zero"}
# The transformer's token-embedding init: 'llama' N(0, 0.02²) (default), 'unit' N(0, 1) (the mixer's).
EMBED_INITS = {"llama": 0.02, "unit": 1.0}


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """A masked mixer LM (docs/masked_mixers.md, docs/recurrent_mixers.md):
    its token-mixing layers' :class:`MixingSpec` and the
    fields of the rest of the model (see ``mixers_jax/config.py`` for each)."""

    token_mixing: MixingSpec
    vocab_size: int
    n_layers: int
    mlp_ratio: int = 4
    layer_norm: bool = True
    residual: bool = True
    mlp: str = "mlp"  # 'none': no channel MLP (nor its norm) in any block
    tie_embeddings: bool = False
    block: str = "mixer"
    dropout_embed: float = 0.0  # dropout rates (training only; layers.dropout)
    dropout_resid: float = 0.0
    scan_layers: bool = False  # blocks as one scanned block, parameters stacked (layers.scan_blocks)
    remat: str = "none"  # rematerialisation of the blocks (layers.REMAT_POLICIES)
    bidirectional: bool = False  # two streams, forward j ≤ i and reverse j ≥ i+2 (models/bidirectional.py)
    # block variants (docs/masked_mixers.md#other-block-variants; mixer.MixerBlock)
    parallel_mixers: int = 1  # P token mixings per block, each with its own norm, outputs summed
    softmax_mixer: bool = False  # softmax over the features of the mixing output
    position_channel: bool = False  # last feature overwritten with i − ⌊n/2⌋ before every block

    @property
    def srm(self) -> bool:
        """The SRM block (FFN first, SiLU, Kaiming init, N(0, 1) embedding;
        docs/recurrent_mixers.md#block-and-model)."""
        return self.block == "srm"

    # shared with the token mixing
    n_ctx = property(lambda self: self.token_mixing.n_ctx)
    d_model = property(lambda self: self.token_mixing.d_model)
    reference = property(lambda self: self.token_mixing.reference)
    causal = property(lambda self: self.token_mixing.causal)
    dtype = property(lambda self: self.token_mixing.dtype)


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """A Llama-style (or, ``transformer='gpt'``, original-GPT) transformer
    (docs/transformer_baseline.md)."""

    vocab_size: int
    n_ctx: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    causal: bool = True  # False: bidirectional attention (encoders); no step form
    layer_norm: bool = True  # False: no norms (block norms and the final norm)
    residual: bool = True  # False: no residual additions
    mlp: str = "mlp"  # 'none': attention-only blocks; 'attention': a second attention as the MLP
    transformer: str = "llama"  # 'gpt': learned positions, LayerNorm, GELU MLP, biases
    dropout_embed: float = 0.0  # dropout rates (training only; layers.dropout)
    dropout_resid: float = 0.0
    dropout_attn: float = 0.0
    scan_layers: bool = False  # blocks as one scanned block, parameters stacked (layers.scan_blocks)
    remat: str = "none"  # rematerialisation of the blocks (layers.REMAT_POLICIES)
    hybrid: str = "none"  # 'series' | 'parallel': a token mixing (``token_mixing``) in every block
    token_mixing: MixingSpec | None = None  # the hybrid's mixing layer (None when hybrid='none')
    # Llama-family checkpoints (docs/hf_import.md): grouped-query attention, head width, SwiGLU
    # width, RMSNorm eps, RoPE frequency scaling; 0 / 'none' keep the baseline
    n_kv_heads: int = 0  # key/value heads (0: n_heads); n_heads must divide by it
    head_dim: int = 0  # per-head width (0: d_model / n_heads)
    mlp_hidden: int = 0  # SwiGLU width (0: mlp_ratio·d_model)
    rms_eps: float = layers.RMS_NORM_EPS
    rope_scaling: str = "none"  # 'none' | 'linear' | 'llama3'
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_n_ctx: int = 8192  # llama3 only: the context the frequencies were trained at
    embed_std: float = 0.02  # token-embedding init N(0, embed_std²) (model.embed_init)

    @property
    def gpt(self) -> bool:
        """The original-GPT layout (docs/transformer_baseline.md#original-gpt-baseline)."""
        return self.transformer == "gpt"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_width(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or self.mlp_ratio * self.d_model

    @property
    def rope(self) -> tuple | None:
        """The RoPE frequency scaling (rope_scaling, factor, low, high, original n_ctx); None: none."""
        if self.rope_scaling == "none":
            return None
        return (self.rope_scaling, self.rope_factor, self.rope_low_freq_factor,
                self.rope_high_freq_factor, self.rope_original_n_ctx)


def _check_common(cfg: Any) -> None:
    for key in ("vocab_size", "n_ctx", "d_model", "n_layers", "mlp_ratio"):
        value = field(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"model.{key} must be a positive integer, got {value!r}")
    if field(cfg, "dtype") not in DTYPES:
        raise UserError(f"model.dtype must be one of {DTYPES}, got {field(cfg, 'dtype')!r}")
    for key in DROPOUTS:
        rate = field(cfg, key, 0.0)
        if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise UserError(f"model.{key} must be a rate in [0, 1), got {rate!r}")
    if _remat(cfg) not in layers.REMAT_POLICIES:
        raise UserError(f"train.remat must be one of {layers.REMAT_POLICIES}, got {_remat(cfg)!r}")


def _remat(cfg: Any) -> str:
    """The blocks' rematerialisation policy: ``train.remat``, which ``build_model`` hands down as
    the model-config key ``remat`` (absent: 'none')."""
    return field(cfg, "remat", "none") or "none"


def _ablations(cfg: Any, mlps: tuple[str, ...]) -> dict:
    """The ablation switches (docs/ablations.md): layer_norm, residual and the channel sublayer
    ``mlp`` (one of ``mlps``); defaults keep the full block."""
    mlp = field(cfg, "mlp", "mlp")
    if mlp not in mlps:
        raise UserError(f"model.mlp must be one of {mlps} for a {field(cfg, 'kind', 'mixer')}, "
                        f"got {mlp!r}")
    return {"layer_norm": bool(field(cfg, "layer_norm", True)),
            "residual": bool(field(cfg, "residual", True)), "mlp": mlp}


def _dropouts(cfg: Any, keys=("dropout_embed", "dropout_resid")) -> dict:
    return {key: float(field(cfg, key, 0.0)) for key in keys}


def mixer_spec(cfg: Any) -> MixerSpec:
    """The checked :class:`MixerSpec` of a flat model config."""
    _check_common(cfg)
    mixing, impl, mask_grad = field(cfg, "mixing"), field(cfg, "mixing_impl"), field(cfg, "mask_grad")
    heads, d = field(cfg, "heads"), field(cfg, "d_model")
    kernel, causal = field(cfg, "kernel", 1), field(cfg, "causal", True)
    check_mixing(mixing, impl, mask_grad, heads, kernel, causal)
    block = field(cfg, "block", "mixer")
    if block not in BLOCKS:
        raise UserError(f"model.block must be one of {BLOCKS}, got {block!r}")
    if heads and d % heads:
        raise UserError(f"model.d_model={d} must be divisible by model.heads={heads}")
    token_mixing = MixingSpec(
        n_ctx=field(cfg, "n_ctx"),
        d_model=d,
        mixing=mixing,
        heads=heads,
        impl=resolve_impl(impl, field(cfg, "n_ctx"), kernel, bool(causal)),
        expanded=bool(field(cfg, "expanded")),
        mask_grad=mask_grad,
        reference=bool(field(cfg, "reference")),
        decay=bool(field(cfg, "decay", True)),
        kaiming=block == "srm",
        kernel=kernel,
        causal=bool(causal),
        dtype=layers.dtype_of(field(cfg, "dtype")),
    )
    return MixerSpec(
        token_mixing=token_mixing,
        vocab_size=field(cfg, "vocab_size"),
        n_layers=field(cfg, "n_layers"),
        mlp_ratio=field(cfg, "mlp_ratio"),
        **_ablations(cfg, MLPS[:2]),
        tie_embeddings=bool(field(cfg, "tie_embeddings")),
        block=block,
        scan_layers=bool(field(cfg, "scan_layers", False)),
        remat=_remat(cfg),
        **_dropouts(cfg),
        bidirectional=_bidirectional(cfg),
        **_block_variants(cfg),
    )


# The mixer block variants (docs/masked_mixers.md#other-block-variants) and their defaults.
BLOCK_VARIANTS = {"parallel_mixers": 1, "softmax_mixer": False, "position_channel": False}


def _block_variants(cfg: Any) -> dict:
    """``model.parallel_mixers`` (an integer >= 1), ``softmax_mixer``, ``position_channel`` (needs
    d_model >= 2: one feature is the position)."""
    p = field(cfg, "parallel_mixers", 1)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise UserError(f"model.parallel_mixers must be an integer >= 1, got {p!r}")
    out = {"parallel_mixers": p, "softmax_mixer": bool(field(cfg, "softmax_mixer", False)),
           "position_channel": bool(field(cfg, "position_channel", False))}
    if out["position_channel"] and field(cfg, "d_model") < 2:
        raise UserError("model.position_channel=True needs model.d_model >= 2 (the last feature "
                        "holds the position)")
    return out


def _no_block_variants(cfg: Any, what: str) -> None:
    """``UserError`` when a mixer block variant is set for a model (``what``) that has no mixer
    blocks of its own."""
    for key, default in BLOCK_VARIANTS.items():
        if field(cfg, key, default) != default:
            raise UserError(f"model.{key} is a masked-mixer block option; {what} does not take it "
                            f"(got {field(cfg, key)!r})")


def _bidirectional(cfg: Any) -> bool:
    """``model.bidirectional``: only the plain flat mixer (one matrix, kernel 1, mixer block, norms,
    residuals, MLP, untied, not scanned) has the two-stream form."""
    if not field(cfg, "bidirectional", False):
        return False
    plain = dict(mixing="flat", heads=0, kernel=1, block="mixer", expanded=False, causal=True,
                 layer_norm=True, residual=True, mlp="mlp", tie_embeddings=False, scan_layers=False,
                 dropout_embed=0.0, dropout_resid=0.0, **BLOCK_VARIANTS)
    other = [k for k, v in plain.items() if field(cfg, k, v) != v]
    if other:
        raise UserError(f"model.bidirectional=True needs the plain flat mixer; it does not combine "
                        f"with model.{other[0]}={field(cfg, other[0])!r}")
    return True


def transformer_spec(cfg: Any) -> TransformerSpec:
    """The checked :class:`TransformerSpec` of a flat model config."""
    _check_common(cfg)
    d, h = field(cfg, "d_model"), field(cfg, "n_heads")
    if not isinstance(h, int) or h < 1:
        raise UserError(f"model.n_heads must be a positive integer, got {h!r}")
    if d % h:
        raise UserError(f"model.d_model={d} must be divisible by model.n_heads={h}")
    arch = field(cfg, "transformer", "llama")
    if arch not in TRANSFORMERS:
        raise UserError(f"model.transformer must be one of {TRANSFORMERS}, got {arch!r}")
    llama = _llama_fields(cfg, h)
    hd = llama["head_dim"] or d // h
    if arch == "llama" and hd % 2:
        raise UserError(f"RoPE needs an even head width; d_model/n_heads = {hd}")
    if arch == "gpt" and any(llama[k] != TransformerSpec.__dataclass_fields__[k].default
                             for k in ("n_kv_heads", "head_dim", "mlp_hidden", "rope_scaling")):
        raise UserError("model.n_kv_heads, head_dim, mlp_hidden and rope_scaling are Llama fields; "
                        "model.transformer='gpt' takes none of them")
    kernel = field(cfg, "kernel", 1)
    if kernel != 1:
        raise UserError(
            f"model.kernel={kernel!r}: kernel mixing is a mixer option; a transformer needs kernel=1")
    _no_block_variants(cfg, "a transformer")
    hybrid = field(cfg, "hybrid", "none")
    if hybrid not in HYBRIDS:
        raise UserError(f"model.hybrid must be one of {HYBRIDS}, got {hybrid!r}")
    embed_init = field(cfg, "embed_init", "llama")
    if embed_init not in EMBED_INITS:
        raise UserError(f"model.embed_init must be one of {tuple(EMBED_INITS)}, got {embed_init!r}")
    if hybrid == "none" and field(cfg, "hybrid_mix_init", "mixer") != "mixer":
        raise UserError("model.hybrid_mix_init is the hybrid mixing's init; it needs "
                        "model.hybrid='series' or 'parallel'")
    return TransformerSpec(
        vocab_size=field(cfg, "vocab_size"),
        n_ctx=field(cfg, "n_ctx"),
        d_model=d,
        n_layers=field(cfg, "n_layers"),
        n_heads=h,
        mlp_ratio=field(cfg, "mlp_ratio"),
        rope_theta=float(field(cfg, "rope_theta")),
        tie_embeddings=bool(field(cfg, "tie_embeddings")),
        dtype=layers.dtype_of(field(cfg, "dtype")),
        causal=bool(field(cfg, "causal", True)),
        **_ablations(cfg, MLPS),
        transformer=arch,
        scan_layers=bool(field(cfg, "scan_layers", False)),
        remat=_remat(cfg),
        **_dropouts(cfg, DROPOUTS),
        hybrid=hybrid,
        token_mixing=None if hybrid == "none" else _hybrid_mixing(cfg),
        **llama,
        embed_std=EMBED_INITS[embed_init],
    )


def _llama_fields(cfg: Any, n_heads: int) -> dict:
    """The checked Llama-family fields (n_kv_heads, head_dim, mlp_hidden, rms_eps, RoPE scaling)."""
    out = {}
    for key in ("n_kv_heads", "head_dim", "mlp_hidden", "rope_original_n_ctx"):
        default = TransformerSpec.__dataclass_fields__[key].default
        value = field(cfg, key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"model.{key} must be an integer >= 0, got {value!r}")
        out[key] = value
    if out["n_kv_heads"] and n_heads % out["n_kv_heads"]:
        raise UserError(f"model.n_heads={n_heads} must be divisible by model.n_kv_heads="
                        f"{out['n_kv_heads']}")
    scaling = field(cfg, "rope_scaling", "none") or "none"
    if scaling not in ROPE_SCALINGS:
        raise UserError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got {scaling!r}")
    out["rope_scaling"] = scaling
    for key in ("rms_eps", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        value = field(cfg, key, TransformerSpec.__dataclass_fields__[key].default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"model.{key} must be a positive number, got {value!r}")
        out[key] = float(value)
    if scaling == "llama3" and out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
        raise UserError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor")
    return out


def _hybrid_mixing(cfg: Any) -> MixingSpec:
    """The token mixing of a transformer-mixer hybrid: the mixer fields ``mixing``, ``heads``,
    ``mixing_impl``, ``mask_grad``, ``expanded``, ``reference`` (flat, one matrix by default),
    causal, kernel 1; its init from ``hybrid_mix_init`` and ``hybrid_mix_std``."""
    mixing, impl, mask_grad = field(cfg, "mixing"), field(cfg, "mixing_impl"), field(cfg, "mask_grad")
    heads, d, n = field(cfg, "heads"), field(cfg, "d_model"), field(cfg, "n_ctx")
    if not field(cfg, "causal", True):
        raise UserError("model.hybrid needs a causal transformer (model.causal=True)")
    check_mixing(mixing, impl, mask_grad, heads, 1, True)
    if heads and d % heads:
        raise UserError(f"model.d_model={d} must be divisible by model.heads={heads}")
    init, std = _hybrid_mix_init(cfg)
    return MixingSpec(
        n_ctx=n, d_model=d, mixing=mixing, heads=heads, impl=resolve_impl(impl, n, 1, True),
        expanded=bool(field(cfg, "expanded")), mask_grad=mask_grad,
        reference=bool(field(cfg, "reference")), decay=bool(field(cfg, "decay", True)),
        dtype=layers.dtype_of(field(cfg, "dtype")), init=init, init_std=std)


def _hybrid_mix_init(cfg: Any) -> tuple[str, float]:
    """(MixingSpec.init, init_std) from ``model.hybrid_mix_init`` and ``hybrid_mix_std`` (> 0)."""
    name, std = field(cfg, "hybrid_mix_init", "mixer"), field(cfg, "hybrid_mix_std", 0.002)
    if name not in HYBRID_MIX_INITS:
        raise UserError(f"model.hybrid_mix_init must be one of {tuple(HYBRID_MIX_INITS)}, "
                        f"got {name!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
        raise UserError(f"model.hybrid_mix_std must be a number > 0, got {std!r}")
    return HYBRID_MIX_INITS[name], float(std)
