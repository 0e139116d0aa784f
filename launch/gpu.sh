#!/usr/bin/env bash
# One machine, one or many GPUs: one process sees all local GPUs; the mesh spans them.
#
#   launch/gpu.sh [--dry-run] [--gpus=0,1,2,3] [--venv=DIR] -- --config=configs/NAME.py[:preset] [--workdir=DIR] [--config.k=v ...]
#
# --gpus     CUDA_VISIBLE_DEVICES (default: all GPUs)
# --install  pip install -e . first (into --venv if given)
# --dry-run  print the commands instead of running them
set -euo pipefail

DRY=0; GPUS=""; INSTALL=0; VENV=""
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --venv=*) VENV="${1#*=}" ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) TRAIN_ARGS+=("$1") ;;
  esac
  shift
done
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "error: give the train flags, e.g. -- --config=configs/mixer_clm.py:tinystories" >&2; exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="python"; [[ -n "$VENV" ]] && PY="$VENV/bin/python"

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

run cd "$ROOT"
cd "$ROOT"
[[ -n "$VENV" && ! -x "$VENV/bin/python" ]] && run python -m venv "$VENV"
if [[ $INSTALL -eq 1 ]]; then
  run "$PY" -m pip install -e "$ROOT" "jax[cuda12]"
fi
ENVS=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9)
[[ -n "$GPUS" ]] && ENVS+=("CUDA_VISIBLE_DEVICES=$GPUS")
run "${ENVS[@]}" "$PY" -m mixers_jax.train "${TRAIN_ARGS[@]}"
