"""Sampling from a trained model: ``python -m mixers_jax.generate --workdir=DIR --prompt=TEXT``.

    python -m mixers_jax.generate --workdir=/tmp/cpu_mixer --prompt="The module" \\
        [--prompt_file=F] [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] \\
        [--seed=S] [--batch=B] [--mode=auto|recurrent|cached|full]

``--mode`` (all give identical greedy tokens): ``recurrent`` (structured recurrent mixers only:
O(d) state per layer), ``cached`` (one token per step with a cache per layer), ``full`` (the whole
parallel forward for every new token), ``auto`` (recurrent where possible, else cached);
mixers_jax/generation.py describes them. The text streams as it is produced with ``--batch=1``;
with more samples every one is printed at the end. Generation stops at the model's context length
n_ctx with a message.
"""
from __future__ import annotations

import sys

from absl import flags, logging

from mixers_jax import cli
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer, checkpoints).",
                               flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.", flag_values=FLAGS)
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file (UTF-8).",
                                   flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 100, "New tokens per sample (>= 1).", lower_bound=1,
                                flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (>= 0); 0 = greedy.",
                                  lower_bound=0.0, flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).", lower_bound=0,
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: off).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 1, "Samples drawn in parallel from the same prompt (>= 1).",
                              lower_bound=1, flag_values=FLAGS)
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "recurrent", "cached", "full"],  # generation.MODES
                          "recurrent | cached | full | auto.", flag_values=FLAGS)
_CHUNK = flags.DEFINE_integer("chunk", 8, "Tokens per compiled call between streamed outputs (>= 1).",
                              lower_bound=1, flag_values=FLAGS)
flags.register_validator("top_p", lambda p: 0.0 < p <= 1.0, message="--top_p must be in (0, 1]",
                         flag_values=FLAGS)


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    logging.set_verbosity(logging.ERROR)
    text = _PROMPT.value
    if _PROMPT_FILE.value:
        try:
            with open(_PROMPT_FILE.value, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt_file {_PROMPT_FILE.value}: {e}") from None
    from mixers_jax import generation  # jax, the models: loaded after --help
    from mixers_jax.workdir import load_run  # the trainer and orbax: loaded after --help

    r = load_run(_WORKDIR.value)
    ids = r.tokenizer.encode(text) if text else []
    if not ids:  # an empty prompt starts a document: EOS separates documents in training
        ids = [r.tokenizer.eos_id]
    gen = generation.Generator(r.model, r.params, r.config.model, mode=_MODE.value,
                               temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                               top_p=_TOP_P.value, pad_id=r.tokenizer.pad_id)
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    if _BATCH.value == 1:
        write(text)
    generation.stream(gen, r.tokenizer, [ids] * _BATCH.value, _MAX_NEW.value, _SEED.value,
                      _CHUNK.value, write)


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.generate``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("workdir",))


if __name__ == "__main__":
    run_command()
