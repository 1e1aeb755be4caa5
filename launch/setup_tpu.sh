#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Puts the code on every worker of the TPU VM and installs it into a venv.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/setup_tpu.sh [--source=copy|git] [--repo-url=URL] [--ref=REF]
                           [--extras=tpu] [common flags]

On every worker (--worker=all) of TPU_NAME: puts this repository in
~/REMOTE_DIR (now: ${REMOTE_DIR}), creates ~/REMOTE_DIR/.venv with REMOTE_PYTHON
(now: ${REMOTE_PYTHON}; installed with apt if missing) and runs
'pip install -e .[tpu]'. Safe to re-run: the venv is reused.

  --source=copy   (default) tar this working tree (without .venv, .git,
                  workdirs) and scp it to all workers; uncommitted changes go too.
  --source=git    git clone --branch REF URL on each worker (or fetch + checkout
                  when the clone exists).
  --repo-url=URL  repository to clone for --source=git.
  --ref=REF       branch or tag for --source=git (default: main).
  --extras=LIST   pip extras to install (default: tpu).

Multi-worker ssh/scp needs your key in an agent: ssh-add ~/.ssh/google_compute_engine

${COMMON_FLAGS_HELP}
EOF
}

SOURCE=copy
REPO_URL=""
REF=main
EXTRAS=tpu
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --source=*) SOURCE="${1#*=}" ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --extras=*) EXTRAS="${1#*=}" ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
require_gcloud
set_gcloud_scope

remote_dir_q="$(shell_quote "${REMOTE_DIR}")"
archive_name=vgg_jax_src.tar.gz
case "${SOURCE}" in
  copy)
    archive="${TMPDIR:-/tmp}/vgg_jax_src_${TPU_NAME}.tar.gz"
    note "packing ${REPO_ROOT} into ${archive}"
    run tar -czf "${archive}" -C "${REPO_ROOT}" \
      --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
      --exclude=./tmp --exclude='./workdir*' --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ipynb_checkpoints .
    run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:${archive_name}" \
      --worker=all "${GCLOUD_SCOPE[@]}"
    fetch="mkdir -p ${remote_dir_q} && tar -xzf ${archive_name} -C ${remote_dir_q} && rm -f ${archive_name}"
    ;;
  git)
    require_setting REPO_URL "${REPO_URL}" "pass --repo-url=URL with --source=git"
    url_q="$(shell_quote "${REPO_URL}")"
    ref_q="$(shell_quote "${REF}")"
    fetch="if [ -d ${remote_dir_q}/.git ]; then git -C ${remote_dir_q} fetch --depth=1 origin ${ref_q} && git -C ${remote_dir_q} checkout --force FETCH_HEAD; else git clone --depth=1 --branch ${ref_q} ${url_q} ${remote_dir_q}; fi"
    ;;
  *) die "--source must be copy or git, got '${SOURCE}'" ;;
esac

py_q="$(shell_quote "${REMOTE_PYTHON}")"
# apt waits for the dpkg lock: fresh TPU VMs run unattended upgrades at boot.
install="set -e; ${fetch}; cd ${remote_dir_q}; \
if ! command -v ${py_q} >/dev/null; then sudo apt-get -o DPkg::Lock::Timeout=600 update -q && \
sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q ${py_q} ${py_q}-venv; fi; \
[ -x .venv/bin/python ] || ${py_q} -m venv .venv; \
.venv/bin/python -m pip install -q --upgrade pip; \
.venv/bin/python -m pip install -q -e $(shell_quote ".[${EXTRAS}]"); \
.venv/bin/python -c 'import socket, jax, vgg_jax; print(socket.gethostname(), \"jax\", jax.__version__)'"
note "installing on all workers of ${TPU_NAME}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --worker=all --command="${install}"
