# shellcheck shell=bash
# Settings shared by every script in launch/. Each one can be overridden from
# the environment, e.g. `TPU_NAME=vgg16 ZONE=europe-west4-a launch/create_tpu.sh`.
# Empty values are derived from others after flag parsing (see
# finalize_settings in launch/common.sh).

# Google Cloud project; empty means gcloud's configured default project.
PROJECT="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
# Zone that offers the accelerator type (v4: us-central2-b).
ZONE="${ZONE:-us-central2-b}"
# Name of the TPU VM (a single host or a whole pod slice).
TPU_NAME="${TPU_NAME:-vgg-jax}"
# v4-8 is one host with 4 chips; v4-32 is a 4-host pod slice.
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
# TPU software version; empty picks the documented base image for the
# accelerator generation (v4 and older: tpu-ubuntu2204-base, v5e:
# v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
# 1: create the TPU as a Spot VM (much cheaper, can be preempted at any time).
SPOT="${SPOT:-0}"
# GCS bucket for datasets, checkpoints and TensorBoard logs (gs:// optional).
BUCKET="${BUCKET:-}"
# TFDS data dir read by training; empty means ${BUCKET}/tensorflow_datasets.
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
# Parent of the per-config workdirs; empty means ${BUCKET}/workdirs.
WORKDIR_ROOT="${WORKDIR_ROOT:-}"
# Checkout location on each TPU worker, relative to the remote home directory.
REMOTE_DIR="${REMOTE_DIR:-vgg_jax}"
# Python (>= 3.11) used to build the venv on the TPU workers; installed with
# apt when missing (Ubuntu 22.04 ships 3.10 as python3).
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"
# 1: print the commands instead of running them (same as --dry-run).
DRY_RUN="${DRY_RUN:-0}"
