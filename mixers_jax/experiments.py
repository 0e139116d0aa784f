"""The CPU experiments of the results page (docs/results.md): one table, ``EXPERIMENTS``.

Each :class:`Experiment` is one training run into ``<out>/<name>/`` (a workdir): the config with
its preset, ``--config.*`` overrides, follow-up commands (``evaluate``, ...) that write a file into
the run folder, the experiments it needs first (an ``init_from``), the page section and row label it
feeds, the published figure printed beside it and the expected direction (:class:`Expect`).
Changing which preset an experiment uses is its ``config`` field, one line.

Placeholders in overrides and follow-up arguments: ``{out}`` the sweep's results folder, ``{run}``
this run's folder, ``{text}`` the text file of the other-corpus rows (``sweep --text=FILE``; the rows
that need it are not run without it).

**Equal wall time** (``equal_time=REF``): the run trains the model of ``measure`` (an equal-steps
run of the same model) for as many steps as fit into the training time of ``REF``:
steps = round(steps_REF · t_REF / t_measure), with t the step time of each finished run's model
(its saved config and batch) measured by ``bench --suite=runs`` just before, the two timed in turn
round after round so that the machine's load when each trained does not enter the ratio; warmup
scaled by the same factor
and evaluation / checkpoint intervals capped at the new length. The schedule then decays to 0 at
the last step as in every other run; stopping a run on a clock instead would compare one model
mid-schedule and make the result depend on the machine's load at the moment it stopped. The
steps are computed once and recorded in the run's ``sweep.json``, so a resumed run keeps them.
"""
from __future__ import annotations

import dataclasses
import math

OPS = ("<", ">", "~")  # lower, higher, within 5% (relative)
NEAR = 0.05


@dataclasses.dataclass(frozen=True)
class Expect:
    """This row's ``metric`` should be ``op`` the same metric of run ``other`` (``~``: within 5%);
    ``says`` is the published direction in words; ``at_scale`` names the published-size runs (the
    presets) that would decide it where it does not hold at CPU scale."""
    op: str
    other: str
    metric: str
    says: str
    at_scale: str = ""


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    section: str
    label: str
    config: str  # configs/FILE.py[:preset]
    overrides: tuple[str, ...] = ()
    after: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (output file in the run folder, argv)
    needs: tuple[str, ...] = ()
    published: str = ""
    expect: Expect | None = None
    equal_time: str = ""  # the reference run whose training time this run gets
    measure: str = ""  # with equal_time: the equal-steps run of this model that gives its step time
    needs_text: bool = False


def _after_evaluate(out_file: str, *flags: str) -> tuple[str, tuple[str, ...]]:
    return out_file, ("mixers_jax.evaluate", "--workdir={run}", f"--out={{run}}/{out_file}", *flags)


_PROBE_MEMORY = ("--config.model.n_ctx=16", "--config.model.vocab_size=384",
                 "--config.model.encoder.d_model=128", "--config.model.encoder.n_layers=2",
                 "--config.model.encoder.heads=4", "--config.model.encoder.kernel=4",
                 "--config.model.encoder.position=-1")
_TEXT = ("--config.data.source={text}",)
# Published-size runs that decide a direction several rows share.
_AT_SCALE_N128 = ("`mixer_clm.py:tinystories` vs `transformer_clm.py:tinystories`, both with "
                  "`--config.model.n_ctx=128`")
_AT_SCALE_EQUAL_TIME = ("`mixer_clm.py:tinystories` vs `transformer_clm.py:tinystories` for the "
                        "same hours on one GPU")
_AT_SCALE_NO_MEMORY = ("`memory.py:paper_mixer` / `:paper_transformer` with and without "
                       "`--config.model.use_memory=False`")

EXPERIMENTS: tuple[Experiment, ...] = (
    # --------------------------------------------------------------- autoencoders
    Experiment("ae_mixer", "autoencoders", "masked mixer (causal encoder and decoder)",
               "configs/autoencoder.py:cpu_recon",
               published="TinyStories d512 L8: 4.53 / 4.35; d1024 L8: 1.65 / 1.37",
               expect=Expect(">", "ae_transformer", "accuracy",
                             "a mixer autoencoder reconstructs better than a transformer",
                             at_scale="`autoencoder.py:tinystories` vs `:tinystories_transformer`")),
    Experiment("ae_transformer", "autoencoders", "transformer (8 heads, unrolled)",
               "configs/autoencoder.py:cpu_recon_transformer",
               published="TinyStories d512 L8: 5.31 / 5.23; d1024 L4: 5.05 / 4.99"),
    Experiment("ae_unmasked", "autoencoders", "masked mixer, unmasked encoder",
               "configs/autoencoder.py:cpu_recon_unmasked",
               expect=Expect(">", "ae_mixer", "loss",
                             "an unmasked encoder trains less efficiently than a masked one",
                             at_scale=("`autoencoder.py:tinystories` with and without "
                                       "`--config.model.encoder.causal=False`"))),
    Experiment("ae_both_unmasked", "autoencoders", "mixer, unmasked encoder and decoder",
               "configs/autoencoder.py:cpu_recon_both_unmasked",
               expect=Expect(">", "ae_mixer", "loss",
                             "both unmasked is unstable (gradient-norm spikes), worse than masked",
                             at_scale=("`autoencoder.py:tinystories` with and without "
                                       "`--config.model.encoder.causal=False "
                                       "--config.model.decoder.causal=False`"))),
    Experiment("ae_mixer_transformer", "autoencoders", "hybrid: mixer encoder, transformer decoder (d/2)",
               "configs/autoencoder.py:cpu_recon_mixer_transformer",
               expect=Expect(">", "ae_transformer_mixer", "loss",
                             "mixer encoder + transformer decoder is worse than the other hybrid",
                             at_scale=("`autoencoder.py:tinystories` with "
                                       "`--config.model.decoder.kind=transformer` vs "
                                       "`--config.model.encoder.kind=transformer`"))),
    Experiment("ae_transformer_mixer", "autoencoders", "hybrid: transformer encoder (d/2), mixer decoder",
               "configs/autoencoder.py:cpu_recon_transformer_mixer",
               expect=Expect(">", "ae_mixer", "loss", "the mixer autoencoder beats both hybrids",
                             at_scale=("`autoencoder.py:tinystories` vs the same with "
                                       "`--config.model.encoder.kind=transformer`"))),
    # --------------------------------------------------------------- causal LMs, equal steps
    Experiment("clm_flat", "clm", "flat masked mixer", "configs/mixer_clm.py:cpu_small",
               published="FineWeb n512: 1.63 (transformer 1.58); mixers ahead at n32 and n128"),
    Experiment("clm_headed", "clm", "4-head masked mixer", "configs/mixer_clm.py:cpu_small",
               ("--config.model.heads=4",), published="TinyStories: 2-head 1.60 / 1.72 vs k4 1.62 / 1.74",
               expect=Expect("<", "clm_flat", "loss", "a headed mixer is a little better than a flat one",
                             at_scale=("`mixer_clm.py:tinystories` with and without "
                                       "`--config.model.heads=4`"))),
    Experiment("clm_toeplitz", "clm", "Toeplitz masked mixer", "configs/mixer_clm.py:cpu_small",
               ("--config.model.mixing=toeplitz",)),
    Experiment("clm_transformer", "clm", "transformer (4 heads)", "configs/transformer_clm.py:cpu_small",
               published="FineWeb n512: 1.58",
               expect=Expect(">", "clm_flat", "loss", "mixers are ahead of transformers at n128",
                             at_scale=_AT_SCALE_N128)),
    # --------------------------------------------------------------- causal LMs, equal wall time
    Experiment("clm_headed_time", "clm_time", "4-head masked mixer", "configs/mixer_clm.py:cpu_small",
               ("--config.model.heads=4",), equal_time="clm_flat", measure="clm_headed",
               needs=("clm_flat", "clm_headed")),
    Experiment("clm_toeplitz_time", "clm_time", "Toeplitz masked mixer", "configs/mixer_clm.py:cpu_small",
               ("--config.model.mixing=toeplitz",), equal_time="clm_flat", measure="clm_toeplitz",
               needs=("clm_flat", "clm_toeplitz")),
    Experiment("clm_transformer_time", "clm_time", "transformer (4 heads)",
               "configs/transformer_clm.py:cpu_small", equal_time="clm_flat", measure="clm_transformer",
               needs=("clm_flat", "clm_transformer"),
               published="TinyStories, equal 12 h budget: mixer d1024 1.81 / 1.86, "
                         "transformer d1024 2.31 / 2.32",
               expect=Expect(">", "clm_flat", "loss",
                             "in equal time the mixer is ahead (its step is about twice as fast)",
                             at_scale=_AT_SCALE_EQUAL_TIME)),
    # --------------------------------------------------------------- causal LMs, another text
    Experiment("clm_text_flat", "clm_text", "flat masked mixer", "configs/mixer_clm.py:cpu_small", _TEXT,
               needs_text=True),
    Experiment("clm_text_transformer", "clm_text", "transformer (4 heads)",
               "configs/transformer_clm.py:cpu_small", _TEXT, needs_text=True,
               expect=Expect(">", "clm_text_flat", "loss", "mixers are ahead of transformers at n128",
                             at_scale=_AT_SCALE_N128)),
    Experiment("clm_text_transformer_time", "clm_text", "transformer (4 heads), equal wall time",
               "configs/transformer_clm.py:cpu_small", _TEXT, needs_text=True, equal_time="clm_text_flat",
               measure="clm_text_transformer", needs=("clm_text_flat", "clm_text_transformer"),
               expect=Expect(">", "clm_text_flat", "loss", "in equal time the mixer is ahead",
                             at_scale=_AT_SCALE_EQUAL_TIME)),
    # --------------------------------------------------------------- embedding-augmented CLMs
    Experiment("eclm_mixer", "eclm", "embedding-augmented mixer (64 numbers)",
               "configs/embedding_clm.py:cpu_small", after=(_after_evaluate("quant.json", "--quant=all"),),
               published="n1024: normalized loss higher at first, later below the causal model's",
               expect=Expect("<", "clm_flat", "loss",
                             "the decoder's own loss falls below the plain CLM's (the embedding helps)",
                             at_scale=("`embedding_clm.py:paper_mixer` vs `mixer_clm.py:fineweb` at "
                                       "n1024"))),
    Experiment("eclm_transformer", "eclm", "embedding-augmented transformer (64 numbers)",
               "configs/embedding_clm.py:cpu_small_transformer",
               expect=Expect("<", "clm_transformer", "loss",
                             "the decoder's own loss falls below the plain CLM's",
                             at_scale=("`embedding_clm.py:paper_transformer` vs "
                                       "`transformer_clm.py:fineweb` at n1024"))),
    Experiment("eclm_mixer_qat", "quant", "embedding-augmented mixer, noise QAT (q = 1/16)",
               "configs/embedding_clm.py:cpu_small", ("--config.model.qat_noise=0.0625",),
               after=(_after_evaluate("quant.json", "--quant=all"),)),
    # --------------------------------------------------------------- information probes
    Experiment("probe_clm", "probes", "causal mixer LM (position -2)",
               "configs/information.py:cpu_small",
               ("--config.train.init_from={out}/clm_flat",), needs=("clm_flat",),
               published="5.815 / 0.356 / 4.8%",
               expect=Expect("<", "probe_clm_random", "loss",
                             "a causal LM keeps only a little more than an untrained encoder",
                             at_scale=("`information.py:paper_mixer` with and without `init_from` a "
                                       "`mixer_clm.py:fineweb` run"))),
    Experiment("probe_clm_random", "probes", "untrained mixer, n128 (control)",
               "configs/information.py:cpu_small",
               published="5.937 / 0.343 / 4.1%"),
    Experiment("probe_transformer", "probes", "causal transformer LM",
               "configs/information.py:cpu_small_transformer",
               ("--config.train.init_from={out}/clm_transformer",), needs=("clm_transformer",),
               published="6.214 / 0.311 / 4.6%",
               expect=Expect("<", "probe_transformer_random", "loss",
                             "a causal LM keeps a little more than an untrained encoder",
                             at_scale=("`information.py:paper_transformer` with and without `init_from` "
                                       "a `transformer_clm.py:fineweb` run"))),
    Experiment("probe_transformer_random", "probes", "untrained transformer (control)",
               "configs/information.py:cpu_small_transformer", published="6.643 / 0.264 / 4.1%"),
    Experiment("probe_ae", "probes", "mixer autoencoder's encoder (position -1)",
               "configs/information.py:cpu_recon", ("--config.train.init_from={out}/ae_mixer",),
               needs=("ae_mixer",), published="1.528 / 0.831 / 55.3%",
               expect=Expect("<", "probe_ae_random", "loss",
                             "an autoencoder's encoder keeps far more than an untrained one",
                             at_scale=("`information.py:paper_mixer` with "
                                       "`--config.model.encoder.position=-1`, with and without "
                                       "`init_from` an `autoencoder.py:fineweb` run"))),
    Experiment("probe_ae_random", "probes", "untrained mixer, n32 (control)",
               "configs/information.py:cpu_recon"),
    Experiment("probe_memory", "probes", "memory model's encoder (main job, n16)",
               "configs/information.py:cpu", (*_PROBE_MEMORY, "--config.train.init_from={out}/memory_main"),
               needs=("memory_main",), published="oracle-memory encoder 4.953 / 0.451 / 13.9%",
               expect=Expect("<", "probe_memory_random", "loss",
                             "a trained memory encoder keeps more than an untrained one",
                             at_scale=("the probe of the encoder of a `memory.py:paper_mixer` run vs an "
                                       "untrained one"))),
    Experiment("probe_memory_random", "probes", "untrained memory encoder, n16 (control)",
               "configs/information.py:cpu", _PROBE_MEMORY),
    # --------------------------------------------------------------- memory models
    Experiment("memory_main", "memory", "memory mixer, combined objective (main job)",
               "configs/memory.py:cpu", published="blank copy learned through the memories",
               expect=Expect(">", "memory_nomemory", "blank_copy_acc",
                             "blank copy is learned only through the memories",
                             at_scale=("`memory.py:paper_mixer` with and without "
                                       "`--config.model.use_memory=False`"))),
    Experiment("memory_nomemory", "memory", "no-memory control (empty slots)",
               "configs/memory.py:cpu_nomemory",
               expect=Expect(">", "memory_main", "clm_loss", "memory beats no memory",
                             at_scale=_AT_SCALE_NO_MEMORY)),
    Experiment("memory_clm", "memory", "memory mixer, clm objective only", "configs/memory.py:cpu_clm",
               expect=Expect("~", "memory_main", "clm_loss",
                             "the combined objective costs the clm loss little",
                             at_scale=("`memory.py:paper_mixer` with and without "
                                       "`--config.train.objective=clm`"))),
    Experiment("memory_full_context", "memory", "full-context mixer over the whole row",
               "configs/memory.py:cpu_full_context",
               published="per step the memory mixer matches the full-context mixer",
               expect=Expect("~", "memory_main", "clm_loss",
                             "per step the memory mixer matches the full-context mixer",
                             at_scale=("`memory.py:paper_mixer` vs the same with "
                                       "`--config.model.kind=mixer` over the whole row"))),
    Experiment("memory_transformer", "memory", "memory transformer", "configs/memory.py:cpu_transformer",
               expect=Expect(">", "memory_nomemory", "blank_copy_acc", "memory beats no memory",
                             at_scale=_AT_SCALE_NO_MEMORY)),
    Experiment("memory_rmt", "memory", "recurrent memory (RMT-like)", "configs/memory.py:cpu_rmt",
               published="parallel memories slightly better than recurrent",
               expect=Expect(">", "memory_main", "clm_loss",
                             "parallel memories are slightly better than recurrent",
                             at_scale=("`memory.py:paper_mixer` with and without "
                                       "`--config.model.kind=rmt`"))),
    Experiment("ae_memory_encoder", "autoencoders",
               "mixer autoencoder in the memory encoder's shape (n16 V384 d128; the curriculum's "
               "stage 0)",
               "configs/autoencoder.py:cpu_memory_encoder"),
    Experiment("memory_curriculum", "memory", "curriculum: frozen autoencoder encoder, blank copy, combined",
               "configs/memory.py:cpu_curriculum", ("--config.train.init_from={out}/ae_memory_encoder",),
               needs=("ae_memory_encoder",), published="blank copy and the curriculum succeed",
               expect=Expect(">", "memory_nomemory", "blank_copy_acc",
                             "the curriculum learns blank copy",
                             at_scale="`memory.py:paper_curriculum`")),
)

BY_NAME = {e.name: e for e in EXPERIMENTS}


def select(only: str | None) -> list[Experiment]:
    """The experiments named in the comma-separated ``only`` (all when empty) and what they need,
    in table order except that an experiment comes after what it needs; ValueError naming an
    unknown name."""
    names = [n.strip() for n in (only or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from: {', '.join(BY_NAME)}")
    ordered: list[Experiment] = []

    def visit(name: str) -> None:
        if any(e.name == name for e in ordered):
            return
        for dep in BY_NAME[name].needs:
            visit(dep)
        ordered.append(BY_NAME[name])

    for e in EXPERIMENTS:
        if not names or e.name in names:
            visit(e.name)
    return ordered


def equal_time_steps(ref_steps: int, ref_step_s: float, step_s: float) -> int:
    """Steps of a model whose step takes ``step_s`` in the training time of ``ref_steps`` steps of
    ``ref_step_s`` each (at least 1)."""
    if not (ref_step_s > 0 and step_s > 0 and math.isfinite(ref_step_s) and math.isfinite(step_s)):
        raise ValueError(f"step times must be positive, got {ref_step_s} and {step_s}")
    return max(1, round(ref_steps * ref_step_s / step_s))


def equal_time_overrides(steps: int, own_train: dict) -> tuple[str, ...]:
    """The ``--config.train.*`` overrides that shorten (or lengthen) a run of ``own_train`` (its
    saved train section) to ``steps``: warmup scaled with it, intervals capped at ``steps``."""
    factor = steps / int(own_train["steps"])
    warmup = min(steps - 1, max(1, round(int(own_train["warmup_steps"]) * factor))) if steps > 1 else 0
    return (f"--config.train.steps={steps}", f"--config.train.warmup_steps={warmup}",
            f"--config.train.eval_every={min(int(own_train['eval_every']), steps)}",
            f"--config.train.checkpoint_every={min(int(own_train['checkpoint_every']), steps)}")


def check_expectations() -> list[str]:
    """Problems of the table itself (a name used twice, an expectation or a need naming no
    experiment, an unknown op): an empty list when it is sound."""
    problems = []
    names = [e.name for e in EXPERIMENTS]
    problems += [f"{n} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for e in EXPERIMENTS:
        refs = [*e.needs, *([e.expect.other] if e.expect else []),
                *(x for x in (e.equal_time, e.measure) if x)]
        problems += [f"{e.name} names unknown {r}" for r in refs if r not in BY_NAME]
        if e.expect and not e.expect.at_scale:
            problems.append(f"{e.name}: an expectation names no run that decides it at scale")
        if e.expect and e.expect.op not in OPS:
            problems.append(f"{e.name}: op {e.expect.op!r} not in {OPS}")
        if bool(e.equal_time) != bool(e.measure):
            problems.append(f"{e.name}: equal_time and measure go together")
    return problems
