"""Sampling from a trained model (the library of ``python -m mixers_jax.generate``).

:class:`Generator` compiles generation for one (model, params, mode, sampler); :func:`stream`
writes the text as it is produced; :func:`resolve_mode` picks and checks the inference mode.
Modes (docs/recurrent_mixers.md#inference-modes; all give identical greedy tokens, tested):

* ``recurrent``: structured recurrent mixers only; one token per step through the O(1) recurrences
  (O(d) state per layer, memory flat in the sequence length).
* ``cached``: one token per step through the step forms with a cache per layer (mixing inputs for
  masked mixers, O(n·d); keys/values for the transformer).
* ``full``: the reference's way: keep the n_ctx window padded and run the whole parallel forward
  for every new token.
* ``auto``: recurrent where possible, else cached.

Every row of a batch advances through positions in lockstep: at position t a row consumes its own
prompt token while t < its prompt length, else the token it sampled at t−1, so prompts of different
lengths share one compiled ``lax.scan``. Generation streams text (batch 1: as it is produced; batch
> 1: every row at the end). Masked mixers and SRMs index their weights by absolute position and the
transformer was trained up to n_ctx, so generation stops at n_ctx with a message (no sliding).

Chunked memory models ('memory') generate over their whole row of chunks x n_ctx tokens through
``MemoryLM.step`` (docs/memory_models.md#generation-with-memories): a finished chunk is encoded once
into a memory, and the decoder restarts on the memory slots and the new chunk's tokens; ``Generator.n_ctx``
is that row length. The 'rmt' baseline generates with ``full`` only.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.config import field, input_length
from mixers_jax.errors import UserError
from mixers_jax.models.mixing import MIXING_OPS

MODES = ("auto", "recurrent", "cached", "full")


def has_recurrent_form(model_cfg: Any) -> bool:
    """Whether the model has an O(d)-state step (a mixer whose mixing op has a recurrent form)."""
    op = MIXING_OPS.get(field(model_cfg, "mixing"))
    return field(model_cfg, "kind") == "mixer" and op is not None and op.recurrent is not None


def resolve_mode(model_cfg: Any, mode: str) -> str:
    """'auto' -> 'recurrent' for structured recurrent mixers, else 'cached'; checks the choice."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {MODES}, got {mode!r}")
    srm = has_recurrent_form(model_cfg)
    if mode == "auto":
        return "recurrent" if srm else "cached"
    if mode == "recurrent" and not srm:
        raise UserError(
            "--mode=recurrent needs a structured recurrent mixer (model.mixing row/col/mixed); "
            f"this model is {field(model_cfg, 'kind')}/{field(model_cfg, 'mixing')}: use cached or full"
        )
    return mode


def sample_logits(
    logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Greedy when temperature <= 0; else temperature, top-k and nucleus (top-p) sampling."""
    if temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
        keep = before < top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Compiled generation for one (model, params, mode, sampler).

    ``carry = gen.start(prompts, seed)`` then ``carry = gen.advance(carry, steps)`` (jit, ``steps``
    positions per call, a ``lax.scan``); ``carry['tokens']`` [B, n_ctx] holds prompt + generated
    tokens. ``gen.generate(prompts, max_new)`` does it in one call. The parameters are an argument
    of the compiled scan, not constants folded into it: a flat mixer at n_ctx 2048 holds 256 MB of
    mixing matrices, which as constants took 3.2 s to compile instead of 0.35 s.
    """

    def __init__(self, model, params, model_cfg, *, mode: str = "auto", temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, pad_id: int = 2):
        self.model, self.params = model, params
        self.mode = resolve_mode(model_cfg, mode)
        self.n_ctx = input_length(model_cfg)  # chunks x n_ctx for the chunked memory models
        self.pad_id = int(pad_id)
        self._sample = functools.partial(
            sample_logits, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
        )
        self._advance_jit = jax.jit(self._advance, static_argnums=2, donate_argnums=0)

    def advance(self, carry: dict, steps: int) -> dict:
        """``steps`` more positions (compiled once per ``steps`` and carry shape)."""
        return self._advance_jit(carry, self.params, steps)

    def lower_advance(self, carry: dict, steps: int):
        """The lowered :meth:`advance` (``.compile()`` it; call the result with (carry, params))."""
        return self._advance_jit.lower(carry, self.params, steps)

    def start(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> dict:
        """Initial carry for prompts (lists of token ids, each 1..n_ctx long)."""
        if not prompts:
            raise UserError("no prompts")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise UserError("a prompt must have at least one token")
        if max(lengths) > self.n_ctx:
            raise UserError(
                f"the prompt is {max(lengths)} tokens long but this model's context is "
                f"n_ctx={self.n_ctx} tokens"
            )
        tokens = np.full((len(prompts), self.n_ctx), self.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        carry = {
            "t": jnp.zeros((), jnp.int32),
            "tokens": jnp.asarray(tokens),
            "lengths": jnp.asarray(lengths, jnp.int32),
            "key": jax.random.key(seed),
        }
        if self.mode != "full":
            carry["cache"] = self.model.init_cache(len(prompts), self.mode)
        return carry

    def _logits_at(self, params, carry: dict, t: jax.Array):
        if self.mode == "full":
            logits = self.model.apply({"params": params}, carry["tokens"])
            return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), None
        inp = jax.lax.dynamic_index_in_dim(carry["tokens"], t, axis=1, keepdims=False)
        return self.model.apply({"params": params}, inp, t, carry["cache"], method="step")

    def _advance(self, carry: dict, params, steps: int) -> dict:
        n = self.n_ctx

        def body(carry, _):
            t = jnp.minimum(carry["t"], n - 1)
            logits, cache = self._logits_at(params, carry, t)
            nxt = self._sample(logits, jax.random.fold_in(carry["key"], t))
            tokens = carry["tokens"]
            write = jnp.minimum(t + 1, n - 1)
            old = jax.lax.dynamic_index_in_dim(tokens, write, axis=1, keepdims=False)
            valid = (t + 1 < n) & (t + 1 >= carry["lengths"])
            new = jnp.where(valid, nxt, old)
            carry = dict(carry, t=carry["t"] + 1,
                         tokens=jax.lax.dynamic_update_index_in_dim(tokens, new, write, axis=1))
            if cache is not None:
                carry["cache"] = cache
            return carry, None

        carry, _ = jax.lax.scan(body, carry, None, length=steps)
        return carry

    def end_position(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[int, bool]:
        """(number of positions to fill, whether n_ctx cut generation short)."""
        want = max(len(p) for p in prompts) + int(max_new)
        return min(want, self.n_ctx), want > self.n_ctx

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, seed: int = 0) -> np.ndarray:
        """Tokens [B, n_ctx] (prompt + up to max_new new tokens per row, pad after)."""
        carry = self.start(prompts, seed)
        end, _ = self.end_position(prompts, max_new)
        if end > 1:
            carry = self.advance(carry, end - 1)
        out = np.array(carry["tokens"])
        for i, p in enumerate(prompts):
            out[i, len(p) + max_new:] = self.pad_id
        return out


def stream(gen: Generator, tokenizer, prompts, max_new: int, seed: int, chunk: int,
           write: Callable[[str], None]) -> np.ndarray:
    """Generates ``max_new`` tokens after each prompt, ``chunk`` positions per compiled call, and
    writes the text: batch 1 as it is produced (a split UTF-8 character waits for its other bytes),
    batch > 1 every sample at the end; a note when n_ctx cut generation short. Returns the tokens."""
    carry = gen.start(prompts, seed)
    end, cut = gen.end_position(prompts, max_new)
    b = len(prompts)
    shown = ""
    t = 0
    while t < end - 1:
        carry = gen.advance(carry, chunk)
        t += chunk
        if b == 1:
            toks = np.asarray(carry["tokens"])[0, len(prompts[0]): min(t + 1, end)]
            text = tokenizer.decode(toks)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                text = text.rstrip("\ufffd")
            if text.startswith(shown) and len(text) > len(shown):
                write(text[len(shown):])
                shown = text
    out = np.asarray(carry["tokens"])
    if b == 1:
        text = tokenizer.decode(out[0, len(prompts[0]): end])
        if text.startswith(shown):
            write(text[len(shown):])
        write("\n")
    else:
        for i, p in enumerate(prompts):
            new = out[i, len(p): min(len(p) + max_new, end)]
            write(f"--- sample {i}\n{tokenizer.decode(p)}{tokenizer.decode(new)}\n")
    if cut:
        write(f"[stopped at the context length n_ctx={gen.n_ctx}: this model indexes its weights "
              "by absolute position and cannot go further]\n")
    return out
