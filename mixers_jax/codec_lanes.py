"""The model side of :mod:`mixers_jax.codec`: how a token stream runs through a trained model, in
lanes advancing in lockstep, to give the arithmetic coder one integer frequency table per token.

**Layout** (:class:`Layout`). N tokens, a batch bound B, windows of n_ctx − 1 tokens (n_ctx: the
model's whole input, ``config.input_length``: chunks × n_ctx for the chunked memory models):
W = ⌈N / (n_ctx − 1)⌉. The stream is cut into R lanes of consecutive tokens, lane ℓ holding
tokens [ℓL, (ℓ+1)L), with R ≤ min(B, W) and no lane empty:

* ``restart``: K = ⌈W / min(B, W)⌉ windows per lane, L = K·(n_ctx − 1), R = ⌈W / K⌉. Every
  n_ctx − 1 tokens a lane starts a fresh context: the cache is zeroed and EOS enters at position 0
  (a document start, as in training with concat packing), so the first token of every window is
  predicted from EOS alone.
* ``slide``: L = ⌈N / min(B, W)⌉, R = ⌈N / L⌉. A lane starts with EOS at position 0 once; from
  position n_ctx on, the model's ``slide_step`` drops the oldest position, so every token after a
  lane's first n_ctx − 1 is predicted from the n_ctx − 1 tokens before it (lower bits per byte).
  Only for models whose step form can slide (:func:`sliding_problem`): Toeplitz and structured
  recurrent mixers and RoPE transformers; a flat mixer's rows are per-position weights.

All R lanes advance together, one token each per step, as one batch of R rows through the step
form (``slide`` uses the 'cached' mode; ``restart`` the recurrent one where the model has it), so a
step costs one batched matmul chain instead of R single-row ones. The last lane may be shorter: its
rows beyond the stream are fed EOS and never coded.

**Exactness.** The encoder and the decoder run *the same jitted functions on the same shapes*
(:class:`FrequencySteps`; on CPU): the encoder feeds the known tokens, the decoder the ones it has
just decoded, so the logits are bit-identical. Floating-point results can change with the batch
shape (a row's result may depend on how XLA tiles the batch), so the layout (context, R) is part
of the stream header and the decoder always uses the stream's layout, never its own flags.

**Probabilities -> integers** (inside the same jitted step): e_i = exp(l_i − max l) (float32),
count_i = floor(e_i · 2^20) + 1 (int32; every symbol keeps a count ≥ 1); the cumulative table is an
exact int64 sum on the host. The quantisation costs ≲ V/2^20 of probability mass.

**Order of symbols in the payload.** One arithmetic-coded stream, interleaved: step by step, and
within a step lane 0, 1, ..., R − 1 (lanes past their end skipped). The encoder codes step t − 1 on
the host while the device computes step t; the decoder has to wait for each step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.arithmetic_coder import ArithmeticDecoder, ArithmeticEncoder
from mixers_jax.errors import UserError
from mixers_jax.generation import resolve_mode

COUNT_BITS = 20
CONTEXTS = ("restart", "slide")  # codes 0, 1 in the stream header
DEFAULT_BATCH = 128


def sliding_problem(model) -> str | None:
    """None when ``model`` (a built LM) has a sliding step form, else why not (one sentence)."""
    if getattr(model, "slides", False):
        return None
    mixing = getattr(getattr(getattr(model, "spec", None), "token_mixing", None), "mixing", None)
    what = f"a {mixing!r}-mixing mixer" if mixing else f"this {type(model).__name__} model"
    return (f"--context=slide needs a step form that can drop the oldest position (Toeplitz or "
            f"structured recurrent mixers, RoPE transformers); {what} has none")


def slides_by_default(model) -> bool:
    """``--context=auto``: slide the models for which sliding measured lower bits per byte than
    restarting (RoPE transformers, structured recurrent mixers; README "Compression"); a Toeplitz
    mixer slides only when asked (its 2-layer smoke model coded 8% more bits sliding: its deeper
    layers then read inputs that all carry the last position's bias and full-length sums)."""
    if sliding_problem(model) is not None:
        return False
    mixing = getattr(getattr(model.spec, "token_mixing", None), "mixing", None)
    return mixing != "toeplitz"


def resolve_context(model, context: str) -> str:
    """'auto' -> :func:`slides_by_default`; checks an explicit choice."""
    if context not in CONTEXTS + ("auto",):
        raise UserError(f"--context must be one of auto, {', '.join(CONTEXTS)}; got {context!r}")
    if context == "auto":
        return "slide" if slides_by_default(model) else "restart"
    problem = sliding_problem(model)
    if context == "slide" and problem:
        raise UserError(problem)
    return context


def window_count(n_tokens: int, n_ctx: int) -> int:
    """Windows of n_ctx − 1 tokens (each after an EOS) covering ``n_tokens`` tokens."""
    return -(-n_tokens // (n_ctx - 1)) if n_tokens else 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """``n_tokens`` tokens in ``lanes`` lanes of ``lane_length`` (module doc)."""

    n_tokens: int
    n_ctx: int
    context: str
    lanes: int

    @classmethod
    def plan(cls, n_tokens: int, n_ctx: int, context: str, batch: int) -> "Layout":
        if batch < 1:
            raise UserError(f"--batch must be at least 1, got {batch}")
        w = window_count(n_tokens, n_ctx)
        if not w:
            return cls(n_tokens, n_ctx, context, 0)
        r = min(batch, w)
        if context == "restart":
            k = -(-w // r)
            return cls(n_tokens, n_ctx, context, -(-w // k))
        length = -(-n_tokens // r)
        return cls(n_tokens, n_ctx, context, -(-n_tokens // length))

    @property
    def window(self) -> int:
        return self.n_ctx - 1

    @property
    def lane_length(self) -> int:
        if not self.lanes:
            return 0
        if self.context == "restart":
            w = window_count(self.n_tokens, self.n_ctx)
            return -(-w // self.lanes) * self.window
        return -(-self.n_tokens // self.lanes)

    def is_planned(self) -> bool:
        """Whether :meth:`plan` gives this layout back for its own lane count (a header check)."""
        return self.context in CONTEXTS and self == Layout.plan(
            self.n_tokens, self.n_ctx, self.context, max(self.lanes, 1))

    def grid(self, tokens: Sequence[int], eos: int) -> np.ndarray:
        """[R, L] int32: lane ℓ's tokens, the last lane padded with EOS."""
        flat = np.full(self.lanes * self.lane_length, eos, np.int32)
        flat[: len(tokens)] = tokens
        return flat.reshape(self.lanes, self.lane_length)

    def real(self, t: int) -> np.ndarray:
        """Lanes whose token t exists."""
        return np.nonzero(np.arange(self.lanes) * self.lane_length + t < self.n_tokens)[0]

    def restarts(self, t: int) -> bool:
        """Whether lane position t starts a fresh context (EOS at position 0, zeroed cache)."""
        return t == 0 or (self.context == "restart" and t % self.window == 0)


def frequencies(logits, targets):
    """(counts int32 [R, V], log p(target) float32 [R]) of the logits (module doc)."""
    shifted = logits.astype(jnp.float32)
    shifted = shifted - jnp.max(shifted, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    counts = jnp.floor(e * (1 << COUNT_BITS)).astype(jnp.int32) + 1
    picked = jnp.take_along_axis(shifted, targets[:, None], axis=-1)[:, 0]
    return counts, picked - jnp.log(jnp.sum(e, axis=-1))  # log softmax at the target, same e


class FrequencySteps:
    """The jitted frequency step of a causal LM for one layout: ``self(cache, tokens_R, t,
    targets_R)`` -> (cache, counts [R, V], log p(targets) [R]) for lane position t, whose input
    ``tokens_R`` is the token before it (EOS where :meth:`Layout.restarts`). The decoder passes
    any targets (the counts do not depend on them). Subclasses change where logits come from
    (:meth:`_make_step`, :meth:`init_cache`)."""

    def __init__(self, run, layout: Layout):
        self.run, self.layout = run, layout
        self.mode = "cached" if layout.context == "slide" else resolve_mode(run.config.model, "auto")
        methods = ("step", "slide_step") if layout.context == "slide" else ("step",)
        self._fns = {m: jax.jit(self._make_step(m), donate_argnums=0) for m in methods}

    def _make_step(self, method: str) -> Callable:
        model, variables = self.run.model, {"params": self.run.params}

        def step(cache, tokens_R, pos, targets_R):
            logits, cache = model.apply(variables, tokens_R, pos, cache, method=method)
            return (cache, *frequencies(logits, targets_R))

        return step

    def init_cache(self, lanes: int):
        return self.run.model.init_cache(lanes, self.mode)

    def __call__(self, cache, tokens_R, t: int, targets_R):
        lay = self.layout
        if lay.context == "restart":
            pos, method = t % lay.window, "step"
        else:
            pos, method = t, ("step" if t < lay.n_ctx else "slide_step")
        return self._fns[method](cache, tokens_R, jnp.int32(pos), targets_R)


def run_lanes(steps: FrequencySteps, fill: Callable, eos: int, known: np.ndarray | None = None):
    """For t = 0 .. L − 1: the frequencies of every lane's token t, handed to ``fill(t, counts
    [R, V] int32, logp [R], grid)`` in order of t; returns ``grid`` [R, L]. Decoding (``known``
    None): ``fill`` must set ``grid[:, t]`` of the real lanes (:meth:`Layout.real`) before step
    t + 1. Encoding (``known``: the :meth:`Layout.grid`): step t + 1 is dispatched before ``fill``
    codes step t, so the host codes while the device computes."""
    lay = steps.layout
    grid = known if known is not None else np.full((lay.lanes, lay.lane_length), eos, np.int32)
    eos_R = np.full(lay.lanes, eos, np.int32)
    zeros_R = np.zeros(lay.lanes, np.int32)
    cache, pending = None, None
    for t in range(lay.lane_length):
        if lay.restarts(t):
            cache = steps.init_cache(lay.lanes)
        inputs = eos_R if lay.restarts(t) else grid[:, t - 1]
        targets = grid[:, t] if known is not None else zeros_R
        cache, counts, logp = steps(cache, jnp.asarray(inputs), t, jnp.asarray(targets))
        if known is None:
            fill(t, np.asarray(counts), logp, grid)
            continue
        if pending is not None:
            fill(pending[0], np.asarray(pending[1]), pending[2], grid)
        pending = (t, counts, logp)
    if pending is not None:
        fill(pending[0], np.asarray(pending[1]), pending[2], grid)
    return grid


def code_tokens(tokens: Sequence[int], steps: FrequencySteps, eos: int,
                enc: ArithmeticEncoder) -> float:
    """Codes ``tokens`` in ``steps.layout`` into ``enc``; returns Σ −log2 p of the coded tokens."""
    lay = steps.layout
    if not lay.n_tokens:
        return 0.0
    nll = []

    def fill(t, counts, logp, grid):
        rows = lay.real(t)
        syms = grid[rows, t]
        cum = np.cumsum(counts[rows], axis=1, dtype=np.int64)
        hi = cum[np.arange(len(rows)), syms]
        lo = hi - counts[rows, syms]
        nll.append(np.asarray(logp)[rows].astype(np.float64).sum())
        for a, b, total in zip(lo.tolist(), hi.tolist(), cum[:, -1].tolist()):
            enc.encode(a, b, total)

    run_lanes(steps, fill, eos, lay.grid(tokens, eos))
    return float(-sum(nll) / math.log(2.0))


def decode_tokens(payload: bytes, steps: FrequencySteps, eos: int) -> list[int]:
    """The tokens :func:`code_tokens` coded into ``payload`` with the same layout and model."""
    lay = steps.layout
    if not lay.n_tokens:
        return []
    dec = ArithmeticDecoder(payload)

    def fill(t, counts, logp, grid):
        rows = lay.real(t)
        cum = np.zeros((len(rows), counts.shape[1] + 1), np.int64)
        np.cumsum(counts[rows], axis=1, dtype=np.int64, out=cum[:, 1:])
        for k, lane in enumerate(rows.tolist()):
            grid[lane, t] = dec.decode(cum[k])

    return run_lanes(steps, fill, eos).reshape(-1)[: lay.n_tokens].tolist()
