#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts training on every worker of the TPU VM; resumes from the workdir.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/train_tpu.sh (--config=configs/NAME.py | --recipe=NET)
                           [--workdir=gs://...] [--data-dir=gs://...]
                           [--multiprocess=auto|true|false]
                           [--detach | --stop] [common flags] [-- MAIN_ARGS...]

Runs, on all workers at once (--worker=all; one process per TPU host, which
jax.distributed joins into one job on pod slices):
  python -m vgg_jax.main --config=CONFIG --workdir=WORKDIR
      --config.data.data_dir=DATA_DIR --multiprocess=MODE MAIN_ARGS...
or, with --recipe, the paper's whole chain for net NET (net A, then S=256,
S=384 and S in [256, 512], one stage after another, then its evaluations):
  python -m vgg_jax.recipe --net=NET --root=WORKDIR
      --config.data.data_dir=DATA_DIR --multiprocess=MODE MAIN_ARGS...
Training resumes from the latest checkpoint in WORKDIR (the recipe skips
finished stages), so re-running this after a preemption or a crash continues
the run. A run of vgg_jax.main or vgg_jax.recipe still alive on a worker (pid
in ~/REMOTE_DIR/train.pid) is stopped first, since only one process per host
can hold the TPU.

  --config=PATH       config file relative to the repository, optionally
                      with a stage (configs/vgg16.py:s384).
  --recipe=NET        instead of --config: the whole recipe of NET (vgg16,
                      vgg19, ...); WORKDIR is then its root.
  --workdir=URL       checkpoints and TensorBoard logs; must be gs:// so all
                      workers share it and it outlives the VM (default:
                      WORKDIR_ROOT/<config name> or WORKDIR_ROOT/recipe_NET;
                      WORKDIR_ROOT defaults to BUCKET/workdirs).
  --data-dir=URL      TFDS data dir (default: TFDS_DATA_DIR, which defaults
                      to BUCKET/tensorflow_datasets).
  --multiprocess=M    passed to vgg_jax.main: true on multi-host slices
                      (ACCELERATOR_TYPE, now ${ACCELERATOR_TYPE}, has more than one
                      worker), so each host calls jax.distributed.initialize(),
                      which finds its peers from the TPU metadata; else auto.
  --detach            start in the background with nohup, log to
                      ~/REMOTE_DIR/train.log, and return at once.
  --stop              only stop a running training on all workers.
  -- MAIN_ARGS        passed to vgg_jax.main (or vgg_jax.recipe), e.g.
                      -- --config.train.batch_size=512

Example: BUCKET=gs://my-bucket launch/train_tpu.sh --config=configs/vgg11.py
         BUCKET=gs://my-bucket launch/train_tpu.sh --recipe=vgg16 --detach

${COMMON_FLAGS_HELP}
EOF
}

CONFIG=""
RECIPE=""
WORKDIR=""
DATA_DIR=""
MULTIPROCESS=""
MODE=foreground
EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --recipe=*) RECIPE="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data-dir=*) DATA_DIR="${1#*=}" ;;
    --multiprocess=*) MULTIPROCESS="${1#*=}" ;;
    --detach) MODE=detach ;;
    --stop) MODE=stop ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
require_gcloud
set_gcloud_scope

# Stops the previous run by its recorded pid, and only if that pid is still
# a vgg_jax.main or vgg_jax.recipe process (pids get reused). Expands on the
# worker, not here.
# shellcheck disable=SC2016
stop_previous='is_ours() { grep -qsE "vgg_jax[.](main|recipe)" "/proc/$(cat train.pid)/cmdline"; }; if [ -f train.pid ] && is_ours; then echo "$(hostname): stopping previous run $(cat train.pid)"; kill "$(cat train.pid)"; for _ in $(seq 60); do is_ours || break; sleep 1; done; if is_ours; then kill -9 "$(cat train.pid)"; fi; fi'
cd_remote="cd $(shell_quote "${REMOTE_DIR}") || exit 1"

if [[ "${MODE}" == stop ]]; then
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --worker=all \
    --command="${cd_remote}; ${stop_previous}"
  exit 0
fi

[[ -z "${CONFIG}" || -z "${RECIPE}" ]] || die "pass --config or --recipe, not both"
[[ -n "${RECIPE}" ]] || require_setting CONFIG "${CONFIG}" "pass --config=configs/NAME.py (or --recipe=NET)"
# ml_collections accepts 'file.py:arg'; the file part must exist in the repo.
[[ -n "${RECIPE}" || -f "${REPO_ROOT}/${CONFIG%%:*}" ]] || die "config '${CONFIG%%:*}' not found under ${REPO_ROOT}"
[[ -z "${RECIPE}" || "${RECIPE}" =~ ^vgg[0-9a-z_]+$ ]] || die "--recipe must be a model name such as vgg16, got '${RECIPE}'"
if [[ -z "${MULTIPROCESS}" ]]; then
  if (($(tpu_host_count "${ACCELERATOR_TYPE}") > 1)); then MULTIPROCESS=true; else MULTIPROCESS=auto; fi
fi
[[ "${MULTIPROCESS}" =~ ^(auto|true|false)$ ]] || die "--multiprocess must be auto, true or false, got '${MULTIPROCESS}'"
if [[ -z "${WORKDIR}" ]]; then
  require_setting WORKDIR_ROOT "${WORKDIR_ROOT}" "pass --workdir=gs://BUCKET/... or set BUCKET"
  if [[ -n "${RECIPE}" ]]; then
    WORKDIR="${WORKDIR_ROOT}/recipe_${RECIPE}"
  else
    WORKDIR="${WORKDIR_ROOT}/$(basename "${CONFIG%%:*}" .py)"
  fi
fi
[[ "${WORKDIR}" == gs://* ]] ||
  note "warning: workdir ${WORKDIR} is on each worker's own disk: multi-host runs need a shared gs:// workdir and checkpoints there are lost with the VM"
[[ -n "${DATA_DIR}" ]] || DATA_DIR="${TFDS_DATA_DIR}"

if [[ -n "${RECIPE}" ]]; then
  main=(.venv/bin/python -m vgg_jax.recipe --net="${RECIPE}" --root="${WORKDIR}")
else
  main=(.venv/bin/python -m vgg_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
fi
[[ -z "${DATA_DIR}" ]] || main+=(--config.data.data_dir="${DATA_DIR}")
main+=(--multiprocess="${MULTIPROCESS}" "${EXTRA[@]}")
main_q="$(shell_quote "${main[@]}")"

if [[ "${MODE}" == detach ]]; then
  remote="${cd_remote}; ${stop_previous}; nohup ${main_q} > train.log 2>&1 < /dev/null & echo \$! > train.pid; echo \"\$(hostname): started pid \$(cat train.pid), log in \$(pwd)/train.log\""
else
  # exec keeps the pid written to train.pid for the python process itself.
  remote="${cd_remote}; ${stop_previous}; echo \$\$ > train.pid; exec ${main_q}"
fi
note "training ${CONFIG:-the recipe of ${RECIPE}} on all workers of ${TPU_NAME}, workdir ${WORKDIR}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --worker=all --command="${remote}"
