"""Benchmarks: ``python -m mixers_jax.bench --suite=SUITE [--out=FILE.json]``, SUITE one of train,
mixing, generate, memory, memory_generate, remat, context_memory, runs.

``--suite=runs --workdirs=A,B,...`` times the train steps of finished runs (their saved configs, at
their own batch sizes) in turn, round after round, and prints each one's step time over the
first's: the ratio an equal-wall-time comparison needs (docs/results.md).

Each suite (mixers_jax/benchmarks.py describes them) prints a table and, with ``--out``, writes JSON
holding the device, the library versions, the settings and one record per case. Compare figures as
ratios *within one run*: the machines are shared and noisy.

Exit status: 0 done; 1 an OSError (e.g. an unwritable --out), one line; 2 bad flags or an unknown
case, one line; 130 interrupted (--out untouched).
"""
from __future__ import annotations

import json

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic

FLAGS = cli.flag_values()
_SUITE = flags.DEFINE_enum("suite", "train", ["train", "mixing", "generate", "memory",
                                              "memory_generate", "remat", "context_memory",
                                              "runs"],
                           "Which benchmark.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed repetitions per case (median reported).",
                              lower_bound=1, flag_values=FLAGS)
_D = flags.DEFINE_integer("d_model", 256, "Width (train suite; mixing suite uses it as features).",
                          lower_bound=1, flag_values=FLAGS)
_L = flags.DEFINE_integer("n_layers", 4, "Depth (train suite).", lower_bound=1, flag_values=FLAGS)
_N = flags.DEFINE_integer("n_ctx", 512, "Context length (train suite; memory suite: chunk length).",
                          lower_bound=2, flag_values=FLAGS)
_B = flags.DEFINE_integer("batch", 8, "Global batch (rows).", lower_bound=1, flag_values=FLAGS)
_V = flags.DEFINE_integer("vocab", 4096, "Vocabulary (train suite).", lower_bound=2, flag_values=FLAGS)
_HEADS = flags.DEFINE_integer("heads", 4, "Heads for the headed mixer and the transformer.",
                              lower_bound=1, flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.",
                           flag_values=FLAGS)
_SCAN = flags.DEFINE_bool("scan_layers", False, "Train suite: model.scan_layers (blocks as one "
                           "scanned block; compare compile_s with and without).", flag_values=FLAGS)
_CASES = flags.DEFINE_list("cases", None, "Subset of cases to run (default: all of the suite).",
                           flag_values=FLAGS)
_CONTEXTS = flags.DEFINE_list("contexts", ["256", "512", "1024", "2048", "4096"],
                              "Mixing and context_memory suites: context lengths n.",
                              flag_values=FLAGS)
_GEN_CONTEXTS = flags.DEFINE_list("gen_contexts", ["512", "2048"], "Generate suite n_ctx values.",
                                  flag_values=FLAGS)
_GEN_BATCHES = flags.DEFINE_list("gen_batches", ["1", "64"],
                                 "Generate and memory_generate suites: batch sizes.", flag_values=FLAGS)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Generate suite: new tokens per row.",
                                   lower_bound=1, flag_values=FLAGS)
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Runs suite: the training workdirs to time.",
                              flag_values=FLAGS)
_CHUNKS = flags.DEFINE_list("chunks", ["2", "4", "8", "16"],
                            "Memory and memory_generate suites: chunk counts s.", flag_values=FLAGS)


def _positive_ints(holder) -> list[int]:
    """The values of a list flag as positive integers (UserError naming the flag otherwise)."""
    try:
        values = [int(v) for v in holder.value]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{holder.name} must be a comma list of positive integers, got "
                        f"{','.join(holder.value)!r}")
    return values


def _selected_cases(known) -> list[str]:
    """``--cases`` (default: all of ``known``); an unknown name is a UserError."""
    cases = _CASES.value or list(known)
    unknown = [c for c in cases if c not in known]
    if unknown:
        raise UserError(f"unknown case(s) {unknown}; choose from {list(known)}")
    return cases


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    from mixers_jax import benchmarks as bm  # jax: loaded after --help
    from mixers_jax.environment import environment

    s = bm.Settings(d_model=_D.value, n_layers=_L.value, n_ctx=_N.value, batch=_B.value,
                    vocab=_V.value, heads=_HEADS.value, dtype=_DTYPE.value, steps=_STEPS.value,
                    new_tokens=_NEW_TOKENS.value, scan_layers=_SCAN.value)
    suite = _SUITE.value
    if suite == "train":
        cases = _selected_cases(bm.TRAIN_CASES)
    elif suite == "generate":
        cases = _selected_cases(bm.GEN_CASES)
        contexts, batches = _positive_ints(_GEN_CONTEXTS), _positive_ints(_GEN_BATCHES)
    elif suite == "memory":
        cases = _selected_cases(bm.MEMORY_CASES)
        chunk_counts = _positive_ints(_CHUNKS)
    elif suite == "remat":
        cases = _selected_cases(bm.REMAT_CASES)
    elif suite == "context_memory":
        cases = _selected_cases(bm.CONTEXT_MEMORY_CASES)
        contexts = _positive_ints(_CONTEXTS)
    elif suite == "runs":
        if not _WORKDIRS.value:
            raise UserError("--suite=runs needs --workdirs=DIR[,DIR...]")
    elif suite == "memory_generate":
        cases = _selected_cases(bm.MEMGEN_CASES)
        chunk_counts, batches = _positive_ints(_CHUNKS), _positive_ints(_GEN_BATCHES)
    else:
        cases = _selected_cases(bm.MIXING_CASES)
        contexts = _positive_ints(_CONTEXTS)
    env = environment()
    print(f"# {env['device']} x{env['device_count']}, jax {env['jax']}, python {env['python']}")
    if suite == "train":
        records = bm.bench_train(cases, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, n_ctx=s.n_ctx, batch=s.batch,
                        vocab=s.vocab, heads=s.heads, dtype=s.dtype, steps=s.steps,
                        scan_layers=s.scan_layers)
    elif suite == "generate":
        records = bm.bench_generate(cases, contexts, batches, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, vocab=s.vocab, heads=s.heads,
                        dtype=s.dtype, steps=s.steps, new_tokens=s.new_tokens,
                        contexts=contexts, batches=batches)
    elif suite == "memory":
        records = bm.bench_memory(cases, chunk_counts, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, chunk_len=s.n_ctx, batch=s.batch,
                        vocab=s.vocab, heads=s.heads, dtype=s.dtype, steps=s.steps,
                        chunks=chunk_counts)
    elif suite == "remat":
        records = bm.bench_remat(cases, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, n_ctx=s.n_ctx, batch=s.batch,
                        vocab=s.vocab, heads=s.heads, dtype=s.dtype, steps=s.steps)
    elif suite == "context_memory":
        records = bm.bench_context_memory(cases, contexts, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, batch=s.batch, vocab=s.vocab,
                        heads=s.heads, dtype=s.dtype, contexts=contexts)
    elif suite == "runs":
        records = bm.bench_runs(_WORKDIRS.value, s)
        settings = dict(workdirs=_WORKDIRS.value, rounds=s.steps, steps_per_round=bm.RUN_STEPS_PER_ROUND)
    elif suite == "memory_generate":
        records = bm.bench_memory_generate(cases, chunk_counts, batches, s)
        settings = dict(d_model=s.d_model, n_layers=s.n_layers, chunk_len=s.n_ctx, vocab=s.vocab,
                        heads=s.heads, dtype=s.dtype, steps=s.steps, chunks=chunk_counts,
                        batches=batches)
    else:
        records = bm.bench_mixing(contexts, s, cases)
        settings = dict(batch=s.batch, features=s.d_model, dtype=s.dtype, steps=s.steps,
                        contexts=contexts)
    if _OUT.value:
        out = {"suite": suite, "environment": env, "settings": settings, "records": records}
        write_atomic(_OUT.value, json.dumps(out, indent=2))
        print(f"wrote {_OUT.value}")


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.bench``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    run_command()
