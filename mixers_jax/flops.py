"""Analytic FLOPs per token and model FLOPs utilisation (MFU).

Convention: 2 FLOPs per multiply-add, matmul-like work only (elementwise ops, norms, softmax, loss
and the optimizer are ignored; they are a few percent at sizes where matmuls dominate). Embedding
lookups count 0. Training = forward × 3 (the backward pass of a matmul costs two matmuls: input
gradient and weight gradient).

What is counted is what the implementation computes, not the causal minimum:

* dense masked mixing ``einsum('ij,bjd->bid', W⊙M, x)`` is a full n×n product: n·d multiply-adds
  per token per matrix (the zero upper triangle is multiplied too; the causal minimum would be half).
  Toeplitz 'dense' is the same after materialisation. Headed: H heads × n × d/H = n·d as well.
  Structured recurrent mixing (row / col / mixed, docs/recurrent_mixers.md) is materialised as a dense n×n
  matrix for training, so it counts n·d too (the O(1) recurrence used for generation costs ~2·d
  multiply-adds per token, not counted here).
* kernel mixing (k > 1, docs/masked_mixers.md#kernel-mixing): the k feature-shifted copies
  contracted with the n×n×k kernel in one
  matmul: k·n·d multiply-adds per token per matrix.
* FFT Toeplitz: per sequence and feature, one real FFT of length 2n of the input and one inverse,
  ≈ 2.5·(2n)·log2(2n) FLOPs each (the usual 5·N·log2 N estimate for a complex FFT of length N, halved
  for a real one), plus the complex pointwise product, 6 FLOPs per frequency (n+1 of them). Per token
  that is ≈ d·(10·log2(2n) + 6) FLOPs per mixing op (the kernel's own FFT is negligible: once per
  sequence, not per feature). The backward pass is again two FFT convolutions, so ×3 holds too.
  XLA's cost model charges more, 8·N·log2 N per FFT of length N, real or complex (about 3× this
  estimate); either way the FFT is a few percent of a block next to the FFN's 16·d² per token.
  Unmasked (two-sided) Toeplitz uses FFTs of length 4n: d·(20·log2(4n) + 12) per token.
* attention QKᵀ and AV: the full n×n scores (what ``jax.nn.dot_product_attention`` computes with the
  XLA implementation, i.e. on CPU and by default): 2·n·d multiply-adds per token per layer. ``n`` is
  n_ctx (the length the model is trained at).
"""
from __future__ import annotations

from typing import Any

from mixers_jax.config import field, sub_model_config
from mixers_jax.models.mixing import MixingSpec, resolve_impl



def mixer_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per token of the masked mixer LM (docs/masked_mixers.md); the mixing op's share comes
    from its entry in ``models.mixing.MIXING_OPS``; ``bidirectional``: every block twice;
    ``parallel_mixers`` = P: P token mixings per block. ``softmax_mixer`` and ``position_channel``
    add only elementwise work (not counted)."""
    d, L, V = field(cfg, "d_model"), field(cfg, "n_layers"), field(cfg, "vocab_size")
    r = field(cfg, "mlp_ratio", 4)
    ffn = 2.0 * (2 * r * d * d) if field(cfg, "mlp", "mlp") != "none" else 0.0
    head = 2.0 * d * V
    streams = 2 if field(cfg, "bidirectional", False) else 1  # forward and reverse stream
    n_mix = int(field(cfg, "parallel_mixers", 1))
    return L * streams * (n_mix * token_mixing_flops(cfg) + ffn) + head


def token_mixing_flops(cfg: Any, kernel: int | None = None) -> float:
    """Forward FLOPs per token of one token-mixing layer (``mixing``, ``heads``, ``expanded``,
    ``kernel``, ``causal``, ``mixing_impl``): the op's matrices plus, when headed, the in- and
    out-projections d -> d. ``kernel`` overrides the config's (a hybrid's mixing has k = 1)."""
    n, d, heads = field(cfg, "n_ctx"), field(cfg, "d_model"), field(cfg, "heads", 0)
    n_mix = 2 if field(cfg, "expanded", False) else 1
    kernel = field(cfg, "kernel", 1) if kernel is None else kernel
    causal = field(cfg, "causal", True)
    impl = resolve_impl(field(cfg, "mixing_impl", "auto"), n, kernel, causal)
    spec = MixingSpec(n_ctx=n, d_model=d, mixing=field(cfg, "mixing", "flat"), heads=heads,
                      impl=impl, kernel=kernel, causal=causal)
    mix = n_mix * spec.op.flops_per_token(spec, d)
    proj = 2.0 * (2 * d * d) if heads else 0.0  # in-projection d->d, out-projection d->d
    return mix + proj


def transformer_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per token of the Llama-style baseline (docs/transformer_baseline.md#architecture);
    ``transformer='gpt'``: the MLP has two matrices (fc1, fc2), 2·2·r·d² (biases are not counted).
    Ablations: ``mlp='none'`` counts no MLP, ``mlp='attention'`` a second attention in its place.
    Hybrids (``hybrid='series' | 'parallel'``): one token mixing per block on top. Imported Llamas
    (docs/hf_import.md): q and o have H·hd columns, k and v G·hd, the SwiGLU width is F."""
    n, d, L, V = field(cfg, "n_ctx"), field(cfg, "d_model"), field(cfg, "n_layers"), field(cfg, "vocab_size")
    r = field(cfg, "mlp_ratio", 4)
    h = field(cfg, "n_heads", 1) or 1
    hd = field(cfg, "head_dim", 0) or d / h
    g = field(cfg, "n_kv_heads", 0) or h
    qkvo = 2.0 * d * hd * (2 * h + 2 * g)  # 2·4d² with full heads of width d/H
    attn = 2.0 * 2 * n * h * hd  # QK^T and AV, full n x n
    n_mlp = 2 if field(cfg, "transformer", "llama") == "gpt" else 3  # fc1, fc2 | gate, up, down
    f = field(cfg, "mlp_hidden", 0) or r * d
    mlp = {"none": 0.0, "attention": qkvo + attn}.get(field(cfg, "mlp", "mlp"), 2.0 * n_mlp * f * d)
    hybrid = token_mixing_flops(cfg, kernel=1) if field(cfg, "hybrid", "none") != "none" else 0.0
    head = 2.0 * d * V
    return L * (qkvo + attn + mlp + hybrid) + head


def _head_flops(cfg: Any) -> float:
    return 2.0 * field(cfg, "d_model") * field(cfg, "vocab_size")


def _sub(cfg: Any, role: str, n_ctx: int) -> tuple[dict, float, float]:
    """(sub-config, body FLOPs per position, head FLOPs per position) of a composite model's part."""
    sub = sub_model_config(cfg, role, n_ctx=n_ctx)
    head = _head_flops(sub)
    return sub, _FORWARD[sub["kind"]](sub) - head, head


def memory_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per row token of the chunked memory model (docs/memory_models.md), N = s·n per row.

    Encoder body (no head) on (s−1)·n positions and the bottleneck on s−1 memories (skipped with
    use_memory=False); decoder body on s·(s+n) positions (memory slots included) at length n+s and
    its head on the s·n token slots only.
    """
    s, n = int(field(cfg, "chunks")), int(field(cfg, "n_ctx"))
    dec, dec_body, dec_head = _sub(cfg, "decoder", n + s)
    total = s * (s + n) * dec_body + s * n * dec_head
    if field(cfg, "use_memory", True):
        enc, enc_body, _ = _sub(cfg, "encoder", n)
        d_enc, d_dec = enc["d_model"], dec["d_model"]
        c = int(field(cfg, "compression", 1))
        bottleneck = (2.0 * 2 * d_enc * (d_enc // c) if c > 1 else 0.0) + (
            2.0 * d_enc * d_dec if d_enc != d_dec else 0.0)
        total += (s - 1) * (n * enc_body + bottleneck)
    return total / (s * n)


def rmt_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per row token of the recurrent-memory baseline
    (docs/memory_models.md#recurrent-memory-baseline): per chunk the
    decoder body on n+1 positions (state slot + tokens) and the head on the n token slots."""
    n = int(field(cfg, "n_ctx"))
    _, body, head = _sub(cfg, "decoder", n + 1)
    return ((n + 1) * body + n * head) / n


_FORWARD = {
    "mixer": mixer_forward_flops,
    "transformer": transformer_forward_flops,
    "memory": memory_forward_flops,
    "rmt": rmt_forward_flops,
}


def _bottleneck_flops(d_in: int, c: int, d_out: int) -> float:
    """Per sequence: down d->d/c and up d/c->d (c > 1), bridge d->d_out (widths differ)."""
    f = 2.0 * 2 * d_in * (d_in // c) if c > 1 else 0.0
    return f + (2.0 * d_in * d_out if d_out != d_in else 0.0)


def autoencoder_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per input token of the autoencoder (docs/autoencoders.md): encoder body (no head) on the
    n tokens, the bottleneck once per row (/n), the unroll projection per position, the decoder."""
    n, c = int(field(cfg, "n_ctx")), int(field(cfg, "compression", 1))
    enc, enc_body, _ = _sub(cfg, "encoder", n)
    dec, dec_body, dec_head = _sub(cfg, "decoder", n)
    d_enc, d_dec = enc["d_model"], dec["d_model"]
    unroll = 2.0 * (d_dec // 2) * d_dec if field(cfg, "expansion", "repeat") == "unroll" else 0.0
    return enc_body + _bottleneck_flops(d_enc, c, d_dec) / n + unroll + dec_body + dec_head


def embedding_clm_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per input token of the oracle-embedding causal LM (docs/embedding_lms.md): encoder body
    on n tokens, bottleneck / injection once per row (/n), decoder body on n+1 positions ('token')
    or n (at width d_dec + d_enc/c for 'embedding') and its head on n."""
    n, c = int(field(cfg, "n_ctx")), int(field(cfg, "compression", 1))
    injection = field(cfg, "injection", "token")
    enc, enc_body, _ = _sub(cfg, "encoder", n)
    d_enc = enc["d_model"]
    if injection == "token":
        dec, dec_body, dec_head = _sub(cfg, "decoder", n + 1)
        bottleneck = _bottleneck_flops(d_enc, c, dec["d_model"])
        return enc_body + bottleneck / n + (n + 1) / n * dec_body + dec_head
    dec, _, _ = _sub(cfg, "decoder", n)
    d_dec = dec["d_model"]
    if injection == "embedding":  # blocks and head at d_dec + d_enc/c; no up map
        bottleneck = 2.0 * d_enc * (d_enc // c) if c > 1 else 0.0
        dec["d_model"] = d_dec + d_enc // c
    else:  # add: bottleneck d_enc -> d_enc, then W_p d_enc -> d_dec
        bottleneck = _bottleneck_flops(d_enc, c, d_enc) + 2.0 * d_enc * d_dec
    return enc_body + bottleneck / n + _FORWARD[dec["kind"]](dec)


_FORWARD["autoencoder"] = autoencoder_forward_flops
_FORWARD["embedding_clm"] = embedding_clm_forward_flops


def matcher_forward_flops(cfg: Any) -> float:
    """Forward FLOPs per pool position of the embedding matcher: the mixer blocks and a d -> 1
    score instead of the d -> V head."""
    d, vocab = field(cfg, "d_model"), field(cfg, "vocab_size")
    return mixer_forward_flops(cfg) - 2.0 * d * vocab + 2.0 * d


_FORWARD["matcher"] = matcher_forward_flops


def flops_per_token(model_cfg: Any, training: bool = True) -> float:
    """Analytic matmul FLOPs per token: forward, ×3 when ``training`` (forward + backward)."""
    kind = field(model_cfg, "kind", "mixer")
    if kind not in _FORWARD:
        raise ValueError(f"no FLOPs model for model.kind {kind!r}")
    fwd = _FORWARD[kind](model_cfg)
    return 3.0 * fwd if training else fwd


# bf16 dense peak FLOP/s by device_kind (no sparsity).
_PEAKS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports device_kind 'TPU v5'
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


def peak_flops_per_second(device: Any) -> float | None:
    """bf16 dense peak of a known accelerator (by ``device.device_kind``); None on CPU/unknown."""
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in _PEAKS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation = achieved FLOP/s / peak; None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_second / peak
