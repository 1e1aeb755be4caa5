#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates the Cloud TPU VM (single host or pod slice) named by launch/env.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/create_tpu.sh [--spot | --preemptible] [common flags] [-- GCLOUD_FLAGS...]

Creates the TPU VM TPU_NAME with 'gcloud compute tpus tpu-vm create'.

  --spot           Spot VM (SPOT=1): discounted, preemptible at any time, no
                   runtime limit; a preempted Spot TPU must be deleted and
                   recreated (launch/keep_training.sh does that).
  --preemptible    legacy preemptible TPU (at most 24 h; prefer --spot).
  -- GCLOUD_FLAGS  passed to gcloud unchanged, e.g. -- --reserved --internal-ips

Example: TPU_NAME=vgg16 ACCELERATOR_TYPE=v4-32 launch/create_tpu.sh --spot

${COMMON_FLAGS_HELP}
EOF
}

PREEMPTIBLE=0
EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
[[ "${SPOT}" == 1 && "${PREEMPTIBLE}" == 1 ]] && die "--spot and --preemptible exclude each other"
require_gcloud
set_gcloud_scope

cmd=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_SCOPE[@]}"
  --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
[[ "${SPOT}" == 1 ]] && cmd+=(--spot)
[[ "${PREEMPTIBLE}" == 1 ]] && cmd+=(--preemptible)
cmd+=("${EXTRA[@]}")
run "${cmd[@]}"
