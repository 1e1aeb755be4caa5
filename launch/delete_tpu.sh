#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes the Cloud TPU VM named by launch/env.sh (billing stops; the bucket stays).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/delete_tpu.sh [--yes] [--async] [common flags]

Deletes the TPU VM TPU_NAME. Checkpoints and logs live in the bucket and are
kept.

  -y, --yes   do not ask for confirmation (gcloud --quiet)
  --async     return without waiting for the deletion to finish

${COMMON_FLAGS_HELP}
EOF
}

YES=0
ASYNC=0
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -y | --yes) YES=1 ;;
    --async) ASYNC=1 ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
require_gcloud
set_gcloud_scope

cmd=(gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_SCOPE[@]}")
[[ "${ASYNC}" == 1 ]] && cmd+=(--async)
[[ "${YES}" == 1 ]] && cmd+=(--quiet)
run "${cmd[@]}"
