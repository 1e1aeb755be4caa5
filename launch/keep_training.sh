#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keeps a training run going on a Spot TPU: recreates the VM after each
# preemption, reinstalls, and restarts training, which resumes from the workdir.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/keep_training.sh (--config=configs/NAME.py | --recipe=NET) [--workdir=gs://...]
                               [--spot | --preemptible] [--poll-seconds=60]
                               [--max-failures=3] [--skip-setup]
                               [--assume-state=STATE] [common flags] [-- MAIN_ARGS...]

Loop until training exits successfully:
  state = gcloud compute tpus tpu-vm describe TPU_NAME --format='value(state)'
  READY                         -> setup_tpu.sh (first time on each VM), then
                                   train_tpu.sh (foreground; resumes from WORKDIR)
  PREEMPTED, TERMINATED, STOPPED -> delete_tpu.sh --yes, then create_tpu.sh
  no such TPU                   -> create_tpu.sh (retried every poll while the
                                   zone has no capacity)
  anything else (CREATING, ...) -> wait --poll-seconds
A training failure while the TPU stays READY is a crash, not a preemption;
after --max-failures of those in a row the loop stops.
Run it where it can live for days (tmux/screen on a small VM or workstation).

  --config, --recipe, --workdir,
  --data-dir, --multiprocess, -- MAIN_ARGS   as for launch/train_tpu.sh
  --spot / --preemptible              passed to create_tpu.sh (or SPOT=1)
  --poll-seconds=N                    wait between state checks (default 60)
  --max-failures=N                    crashes on a READY TPU before giving up (default 3)
  --skip-setup                        the current VM is already set up
  --assume-state=STATE                with --dry-run: the state the first
                                      describe pretends to see (default
                                      PREEMPTED; NOT_FOUND for a missing TPU)

${COMMON_FLAGS_HELP}
EOF
}

TRAIN_ARGS=()
CREATE_ARGS=()
POLL_SECONDS=60
MAX_FAILURES=3
NEED_SETUP=1
ASSUME_STATE=PREEMPTED
EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config=* | --recipe=* | --workdir=* | --data-dir=* | --multiprocess=*) TRAIN_ARGS+=("$1") ;;
    --spot) SPOT=1 ;;
    --preemptible) CREATE_ARGS+=(--preemptible) ;;
    --poll-seconds=*) POLL_SECONDS="${1#*=}" ;;
    --max-failures=*) MAX_FAILURES="${1#*=}" ;;
    --skip-setup) NEED_SETUP=0 ;;
    --assume-state=*) ASSUME_STATE="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
[[ "${POLL_SECONDS}" =~ ^[0-9]+$ ]] || die "--poll-seconds must be a whole number, got '${POLL_SECONDS}'"
[[ "${MAX_FAILURES}" =~ ^[1-9][0-9]*$ ]] || die "--max-failures must be a positive number, got '${MAX_FAILURES}'"
require_gcloud
set_gcloud_scope
export_settings
TRAIN_ARGS+=(-- "${EXTRA[@]}")

# Dry runs replay one recovery: the assumed state first, READY afterwards.
DRY_STATES=("${ASSUME_STATE}")
# Sets TPU_STATE to the node's state, or NOT_FOUND when describe fails.
query_state() {
  local cmd=(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --format='value(state)')
  if is_dry_run; then
    run "${cmd[@]}"
    TPU_STATE="${DRY_STATES[0]:-READY}"
    DRY_STATES=("${DRY_STATES[@]:1}")
    note "(dry run) state: ${TPU_STATE}"
    return
  fi
  TPU_STATE="$("${cmd[@]}" 2>/dev/null)" || TPU_STATE=NOT_FOUND
  [[ -n "${TPU_STATE}" ]] || TPU_STATE=NOT_FOUND
}

failures=0
while true; do
  query_state
  case "${TPU_STATE}" in
    READY)
      if ((NEED_SETUP)); then
        if "${LAUNCH_DIR}/setup_tpu.sh"; then
          NEED_SETUP=0
        else
          failures=$((failures + 1))
          note "setup failed (${failures}/${MAX_FAILURES})"
          ((failures < MAX_FAILURES)) || die "setup failed ${failures} times on a READY TPU; giving up"
          run sleep "${POLL_SECONDS}"
          continue
        fi
      fi
      if "${LAUNCH_DIR}/train_tpu.sh" "${TRAIN_ARGS[@]}"; then
        note "training finished"
        exit 0
      fi
      query_state
      if [[ "${TPU_STATE}" == READY ]]; then
        failures=$((failures + 1))
        note "training failed on a READY TPU (${failures}/${MAX_FAILURES})"
        ((failures < MAX_FAILURES)) || die "training failed ${failures} times in a row without a preemption; see the log above"
      else
        note "training stopped, TPU is ${TPU_STATE}"
        failures=0
      fi
      ;;
    PREEMPTED | TERMINATED | STOPPED | NOT_FOUND)
      if [[ "${TPU_STATE}" != NOT_FOUND ]]; then
        note "TPU ${TPU_NAME} is ${TPU_STATE}: deleting and recreating it"
        "${LAUNCH_DIR}/delete_tpu.sh" --yes || true
      fi
      if "${LAUNCH_DIR}/create_tpu.sh" "${CREATE_ARGS[@]}"; then
        NEED_SETUP=1
      else
        note "create failed (no capacity?); retrying in ${POLL_SECONDS}s"
        run sleep "${POLL_SECONDS}"
      fi
      ;;
    *)
      note "TPU ${TPU_NAME} is ${TPU_STATE}; waiting"
      run sleep "${POLL_SECONDS}"
      ;;
  esac
done
