#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds TFDS imagenet2012 as array_record once, then uploads it to the bucket.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/prepare_imagenet.sh --manual-dir=DIR [--build-dir=DIR]
                                  [--upload-to=gs://... | --no-upload]
                                  [--python=PYTHON] [common flags]

Runs on this machine (it needs the ImageNet tars and about 160 GB free disk;
a TPU VM's boot disk is too small), once per project:
 1. builds imagenet2012 (train + validation) in array_record format into
    BUILD_DIR, the same as
      tfds build imagenet2012 --file_format=array_record \\
        --manual_dir=MANUAL_DIR --data_dir=BUILD_DIR
    but through the Python API: the tfds CLI of tensorflow-datasets 4.9.10
    does not start without apache-beam installed;
 2. gcloud storage rsync --recursive BUILD_DIR/imagenet2012 UPLOAD_TO/imagenet2012
    (re-running resumes an interrupted upload).
Training then reads it with --config.data.data_dir=UPLOAD_TO (train_tpu.sh
passes TFDS_DATA_DIR).

  --manual-dir=DIR  holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
                    (image-net.org downloads; default: MANUAL_DIR, now ${MANUAL_DIR:-unset}).
  --build-dir=DIR   local TFDS data dir to build into (default: BUILD_DIR or
                    ~/tensorflow_datasets).
  --upload-to=URL   default: TFDS_DATA_DIR (defaults to BUCKET/tensorflow_datasets).
  --no-upload       stop after the build.
  --python=PATH     interpreter with tensorflow-datasets (default: the repo's .venv).

${COMMON_FLAGS_HELP}
EOF
}

MANUAL_DIR="${MANUAL_DIR:-}"
BUILD_DIR="${BUILD_DIR:-${HOME}/tensorflow_datasets}"
UPLOAD_TO=""
UPLOAD=1
PYTHON="${REPO_ROOT}/.venv/bin/python"
[[ -x "${PYTHON}" ]] || PYTHON=python3
DATASET=imagenet2012
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --manual-dir=*) MANUAL_DIR="${1#*=}" ;;
    --build-dir=*) BUILD_DIR="${1#*=}" ;;
    --upload-to=*) UPLOAD_TO="${1#*=}" ;;
    --no-upload) UPLOAD=0 ;;
    --python=*) PYTHON="${1#*=}" ;;
    *) common_flag "$1" || bad_flag "$1" ;;
  esac
  shift
done
finalize_settings
require_setting MANUAL_DIR "${MANUAL_DIR}" "pass --manual-dir=DIR (the directory with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)"
if ((UPLOAD)); then
  [[ -n "${UPLOAD_TO}" ]] || UPLOAD_TO="${TFDS_DATA_DIR}"
  require_setting UPLOAD_TO "${UPLOAD_TO}" "pass --upload-to=gs://BUCKET/tensorflow_datasets, set BUCKET, or pass --no-upload"
  require_gcloud
fi
if ! is_dry_run; then
  for tar_name in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
    [[ -f "${MANUAL_DIR}/${tar_name}" ]] || die "${MANUAL_DIR}/${tar_name} not found (download it from image-net.org)"
  done
fi

build_py='import sys, tensorflow_datasets as tfds; name, data_dir, manual_dir = sys.argv[1:]; builder = tfds.builder(name, data_dir=data_dir, file_format="array_record"); builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)); print(builder.info.splits)'
note "building ${DATASET} (array_record) into ${BUILD_DIR}; this takes hours"
run "${PYTHON}" -c "${build_py}" "${DATASET}" "${BUILD_DIR}" "${MANUAL_DIR}"
if ((UPLOAD)); then
  run gcloud storage rsync --recursive "${BUILD_DIR}/${DATASET}" "${UPLOAD_TO%/}/${DATASET}"
fi
