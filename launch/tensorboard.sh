#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Serves TensorBoard for the runs under the bucket's workdirs.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/tensorboard.sh [--logdir=URL] [--port=6006] [--on-tpu] [common flags]

Serves TensorBoard on http://localhost:PORT for every run under LOGDIR
(default: WORKDIR_ROOT, which defaults to BUCKET/workdirs); each workdir
is one run.

  --logdir=URL  a workdir or a parent of workdirs (gs:// or local).
  --port=N      local port (default 6006).
  --on-tpu      run TensorBoard on worker 0 of TPU_NAME and forward the port
                over ssh (no local TensorBoard or GCS credentials needed).

${COMMON_FLAGS_HELP}
EOF
}

LOGDIR=""
PORT=6006
ON_TPU=0
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --logdir=*) LOGDIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --on-tpu) ON_TPU=1 ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
[[ -n "${LOGDIR}" ]] || LOGDIR="${WORKDIR_ROOT}"
require_setting LOGDIR "${LOGDIR}" "pass --logdir=gs://BUCKET/workdirs or set BUCKET"
[[ "${PORT}" =~ ^[0-9]+$ ]] || die "--port must be a number, got '${PORT}'"

if ((ON_TPU)); then
  require_gcloud
  set_gcloud_scope
  tb="$(shell_quote "${REMOTE_DIR}/.venv/bin/tensorboard" --logdir="${LOGDIR}" --port="${PORT}")"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --worker=0 \
    --command="${tb}" -- -L "${PORT}:localhost:${PORT}"
else
  tensorboard="${REPO_ROOT}/.venv/bin/tensorboard"
  [[ -x "${tensorboard}" ]] || tensorboard=tensorboard
  run "${tensorboard}" --logdir="${LOGDIR}" --port="${PORT}"
fi
