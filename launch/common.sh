# shellcheck shell=bash source-path=SCRIPTDIR
# Helpers shared by the scripts in launch/: dry-run execution, shell quoting,
# the flags every TPU script accepts, and settings derived from launch/env.sh.
# Sourced, never run.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Used by the scripts that source this file.
# shellcheck disable=SC2034
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
# shellcheck source=env.sh
source "${LAUNCH_DIR}/env.sh"

# Help text for the flags handled by common_flag, appended to each usage.
# shellcheck disable=SC2034
COMMON_FLAGS_HELP="Common flags (each also settable through the environment):
  --project=ID            PROJECT           (now: ${PROJECT:-gcloud default})
  --zone=ZONE             ZONE              (now: ${ZONE})
  --name=NAME             TPU_NAME          (now: ${TPU_NAME})
  --accelerator-type=T    ACCELERATOR_TYPE  (now: ${ACCELERATOR_TYPE})
  --version=V             RUNTIME_VERSION   (now: ${RUNTIME_VERSION:-derived from the accelerator type})
  --bucket=gs://B         BUCKET            (now: ${BUCKET:-unset})
  --dry-run               DRY_RUN=1: print the commands, run nothing
  -h, --help              this help
Other settings: TFDS_DATA_DIR, WORKDIR_ROOT, REMOTE_DIR, REMOTE_PYTHON, SPOT
(defaults and meaning in launch/env.sh)."

die() {
  echo "error: $*" >&2
  exit 1
}

is_dry_run() {
  [[ "${DRY_RUN}" == 1 || "${DRY_RUN}" == true ]]
}

# Prints the words as one line that a POSIX shell parses back into the same
# words; plain words stay unquoted so the line stays readable.
shell_quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  local out=() word
  for word in "$@"; do
    if [[ "${word}" =~ ${safe} ]]; then
      out+=("${word}")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# Runs a command, or under dry-run prints it on stdout and runs nothing.
# Real runs echo the command on stderr first so logs show what ran.
run() {
  if is_dry_run; then
    printf '%s\n' "$(shell_quote "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shell_quote "$@")" >&2
  "$@"
}

# A progress message: a comment line in dry-run output, stderr otherwise.
note() {
  if is_dry_run; then
    printf '# %s\n' "$*"
  else
    printf '[%s] %s\n' "$(date '+%F %T')" "$*" >&2
  fi
}

# Handles the flags shared by all TPU scripts; returns 1 for any other word.
common_flag() {
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=* | --tpu-name=*) TPU_NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=* | --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    *) return 1 ;;
  esac
}

bad_flag() {
  die "unknown flag '$1' (value flags take the form --flag=VALUE; see --help)"
}

# The documented base image for each TPU generation (cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  case "$1" in
    v6e-* | v6e) echo v2-alpha-tpuv6e ;;
    v5p-* | v5p) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-* | v5e) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# Hosts (TPU VM workers) in a slice: v2-v5p type names count TensorCores
# (8 per host), v5e/v6e names count chips (one host up to 8, then 4 per host).
tpu_host_count() {
  local generation="${1%-*}" size="${1##*-}"
  case "${generation}" in
    v5litepod | v5e | v6e) ((size <= 8)) && echo 1 || echo $((size / 4)) ;;
    *) ((size <= 8)) && echo 1 || echo $((size / 8)) ;;
  esac
}

# Fills the settings left empty in env.sh and checks the ones gcloud needs;
# call after flag parsing so flags and environment both count.
finalize_settings() {
  [[ -n "${RUNTIME_VERSION}" ]] || RUNTIME_VERSION="$(default_runtime_version "${ACCELERATOR_TYPE}")"
  if [[ -n "${BUCKET}" ]]; then
    BUCKET="gs://${BUCKET#gs://}"
    BUCKET="${BUCKET%/}"
    [[ -n "${TFDS_DATA_DIR}" ]] || TFDS_DATA_DIR="${BUCKET}/tensorflow_datasets"
    [[ -n "${WORKDIR_ROOT}" ]] || WORKDIR_ROOT="${BUCKET}/workdirs"
  fi
  [[ -n "${ZONE}" ]] || die "ZONE is empty: set ZONE or pass --zone=ZONE"
  # Cloud TPU node ids: lowercase letters, digits and dashes, starting with a letter.
  [[ "${TPU_NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU_NAME '${TPU_NAME}' is not a valid TPU name (lowercase letters, digits, dashes; starts with a letter)"
  [[ "${ACCELERATOR_TYPE}" =~ ^v[0-9][a-z]*-[0-9]+$ ]] ||
    die "ACCELERATOR_TYPE '${ACCELERATOR_TYPE}' is not of the form v4-8, v5litepod-16, v6e-8, ..."
}

# Child scripts started by keep_training.sh see flag overrides through these.
export_settings() {
  export PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT BUCKET \
    TFDS_DATA_DIR WORKDIR_ROOT REMOTE_DIR REMOTE_PYTHON DRY_RUN
}

# Sets GCLOUD_SCOPE to the --zone/--project flags every tpu-vm command takes.
set_gcloud_scope() {
  GCLOUD_SCOPE=(--zone="${ZONE}")
  [[ -z "${PROJECT}" ]] || GCLOUD_SCOPE+=(--project="${PROJECT}")
}

# Real runs need the Google Cloud CLI; dry runs never call it.
require_gcloud() {
  is_dry_run || command -v gcloud >/dev/null ||
    die "gcloud not found on PATH: install the Google Cloud CLI (cloud.google.com/sdk)"
}

require_setting() {
  local name="$1" value="$2" hint="$3"
  [[ -n "${value}" ]] || die "${name} is not set: ${hint}"
}
