#!/usr/bin/env bash
# A TPU VM slice with gcloud: create it (or reuse it), copy or clone the code, install, run the same
# train command on every worker (jax.distributed needs no arguments on a pod), fetch the logs.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE --type=v4-32 [--version=tpu-ubuntu2204-base]
#       [--project=P] [--repo=GIT_URL[@REF]] [--spot] [--fetch=DIR] -- --config=configs/NAME.py[:preset] --workdir=gs://bucket/run
#
# Without --repo the local checkout is copied (gcloud compute tpus tpu-vm scp). The workdir should
# be on storage every worker sees (a GCS path via orbax, or a shared mount).
set -euo pipefail

DRY=0; NAME=""; ZONE=""; TYPE=""; VERSION="tpu-ubuntu2204-base"; PROJECT=""; REPO=""; SPOT=0; FETCH="tpu_logs"
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --fetch=*) FETCH="${1#*=}" ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) TRAIN_ARGS+=("$1") ;;
  esac
  shift
done
for v in NAME ZONE TYPE; do
  if [[ -z "${!v}" ]]; then echo "error: --$(echo $v | tr A-Z a-z)= is required" >&2; exit 2; fi
done
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "error: give the train flags after --, e.g. -- --config=configs/mixer_clm.py:fineweb" >&2; exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
G=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
ALL=(--worker=all)
REMOTE_DIR='$HOME/mixers_jax'
LOG='$HOME/mixers_train.log'

run() {
  if [[ $DRY -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
quote() { printf '%q ' "$@"; }

# 1. create the slice unless it exists
if [[ $DRY -eq 1 ]] || ! "${G[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  CREATE=("${G[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. the code: clone a repository or copy this checkout
if [[ -n "$REPO" ]]; then
  URL="${REPO%@*}"; REF=""; [[ "$REPO" == *@* ]] && REF="${REPO##*@}"
  CLONE="rm -rf $REMOTE_DIR && git clone $(quote "$URL") $REMOTE_DIR"
  [[ -n "$REF" ]] && CLONE+=" && git -C $REMOTE_DIR checkout $(quote "$REF")"
  run "${G[@]}" ssh "$NAME" "${LOC[@]}" "${ALL[@]}" --command="$CLONE"
else
  run "${G[@]}" scp --recurse "$ROOT" "$NAME:mixers_jax" "${LOC[@]}" "${ALL[@]}"
fi

# 3. install on every worker
run "${G[@]}" ssh "$NAME" "${LOC[@]}" "${ALL[@]}" \
  --command="cd $REMOTE_DIR && pip install -q -e . 'jax[tpu]'"

# 4. the same command on all workers (TPU pods: jax.distributed.initialize() needs no arguments)
TRAIN="cd $REMOTE_DIR && python -m mixers_jax.train --distributed=on $(quote "${TRAIN_ARGS[@]}")2>&1 | tee $LOG"
run "${G[@]}" ssh "$NAME" "${LOC[@]}" "${ALL[@]}" --command="$TRAIN"

# 5. fetch worker 0's log (process 0 writes the progress log)
run mkdir -p "$FETCH"
run "${G[@]}" scp "$NAME:mixers_train.log" "$FETCH/" "${LOC[@]}" --worker=0
