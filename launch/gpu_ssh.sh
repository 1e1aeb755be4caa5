#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-node GPU training over plain ssh: one process per host, no scheduler.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/gpu_ssh.sh --hosts=HOST1,HOST2,... --config=configs/NAME.py --workdir=DIR
                         [--coordinator=HOST:PORT] [--remote-dir=DIR] [--python=PATH]
                         [--dry-run] [-- MAIN_ARGS...]

Starts vgg_jax.main on every host at once through ssh (keys, no password:
ssh -o BatchMode=yes), host i as process i, host 1 as the coordinator:
  VGG_JAX_COORDINATOR=HOST1:PORT VGG_JAX_NUM_PROCESSES=<hosts> VGG_JAX_PROCESS_ID=i
Each process uses all GPUs of its host. Output lines are prefixed with the
host. If one host fails, the others are stopped (ssh -tt, so closing the
connection ends the remote process) and the script exits non-zero.

  --hosts=LIST          comma-separated ssh targets (or HOSTS, space or comma
                        separated); user@host works.
  --config=PATH         config file relative to the repository (required).
  --workdir=DIR         directory every host can write (shared FS or gs://; required).
  --coordinator=H:P     coordinator address the other hosts can reach
                        (default: first host, port COORDINATOR_PORT or 12345).
  --remote-dir=DIR      repository on the hosts (default: this checkout's path).
  --python=PATH         interpreter on the hosts (default: .venv/bin/python in it).
  --dry-run             print the ssh commands (DRY_RUN=1).
  -- MAIN_ARGS          passed to vgg_jax.main.
EOF
}

HOSTS_LIST="${HOSTS:-}"
CONFIG=""
WORKDIR=""
COORDINATOR=""
REMOTE_REPO="${REPO_ROOT}"
PYTHON=.venv/bin/python
EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --hosts=*) HOSTS_LIST="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --coordinator=*) COORDINATOR="${1#*=}" ;;
    --remote-dir=*) REMOTE_REPO="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) bad_flag "$1" ;;
  esac
  shift
done
read -r -a hosts <<<"${HOSTS_LIST//,/ }"
((${#hosts[@]})) || die "no hosts: pass --hosts=HOST1,HOST2 or set HOSTS"
require_setting CONFIG "${CONFIG}" "pass --config=configs/NAME.py"
require_setting WORKDIR "${WORKDIR}" "pass --workdir=DIR that every host can write"
if [[ -z "${COORDINATOR}" ]]; then
  COORDINATOR="${hosts[0]#*@}:${COORDINATOR_PORT:-12345}"
fi
[[ "${COORDINATOR}" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '${COORDINATOR}'"

main_q="$(shell_quote "${PYTHON}" -m vgg_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" \
  --multiprocess=true "${EXTRA[@]}")"
# Job control gives each host's pipeline its own process group, so a failure
# can stop exactly the pipelines started here.
set -m
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-${pid}" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

for i in "${!hosts[@]}"; do
  host="${hosts[i]}"
  remote="cd $(shell_quote "${REMOTE_REPO}") || exit 1; \
export VGG_JAX_COORDINATOR=$(shell_quote "${COORDINATOR}") VGG_JAX_NUM_PROCESSES=${#hosts[@]} VGG_JAX_PROCESS_ID=${i}; \
exec ${main_q}"
  if is_dry_run; then
    run ssh -tt -o BatchMode=yes "${host}" "${remote}"
    continue
  fi
  (run ssh -tt -o BatchMode=yes "${host}" "${remote}" </dev/null 2>&1 |
    sed -u -e 's/\r$//' -e "s/^/[${host}] /") &
  pids+=("$!")
done
is_dry_run && exit 0

# Wait for all hosts; the first failure stops the rest.
while ((${#pids[@]})); do
  if ! wait -n; then
    note "a host failed; stopping the others"
    exit 1
  fi
  alive=()
  for pid in "${pids[@]}"; do
    if kill -0 "${pid}" 2>/dev/null; then alive+=("${pid}"); fi
  done
  pids=("${alive[@]}")
done
note "all ${#hosts[@]} hosts finished"
