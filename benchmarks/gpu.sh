#!/usr/bin/env bash
# VGG-16 bf16 training throughput and MFU on a GPU machine, synthetic data.
#
# Runs the project's own jitted train step (benchmarks/train_step.py) at
# batch 256 (split over all visible GPUs) and prints images/s and MFU against
# the GPU's dense bf16 peak. Expected to take a few minutes, mostly compilation
# (not yet timed on a GPU).
#
#   bash benchmarks/gpu.sh                     # from the repo root
#   PEAK_TFLOPS=989 BATCH=256 bash benchmarks/gpu.sh
#   bash benchmarks/gpu.sh --smoke             # tiny CPU run: checks the script
#
# Other arguments go to benchmarks/train_step.py (e.g. --models=vgg11,vgg16).
# Environment: PYTHON (default .venv/bin/python, else python3); PEAK_TFLOPS
# (default 989: H100/H200 SXM dense bf16); BATCH (default 256); WHEELHOUSE (a
# folder of wheels to install missing dependencies from, offline).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n ${PYTHON:-} ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

smoke=0
extra=()
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    *) extra+=("$arg") ;;
  esac
done

die() {
  echo "gpu.sh: ERROR: $*" >&2
  exit 1
}

# Fail fast when offline instead of pip's minutes of retries.
pip_install() {
  local opts=(--retries 1 --timeout 15)
  if [[ -n ${WHEELHOUSE:-} ]]; then
    opts+=(--no-index --find-links "$WHEELHOUSE")
  fi
  "$py" -m pip install "${opts[@]}" "$@"
}

has_gpu_jax() {
  "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
    >/dev/null 2>&1
}

# Prints nothing when the project's train step imports, else what is missing
# (checked against vgg_jax's install_requires, as module names).
import_problem() {
  "$py" - 2>/dev/null <<'PYTHON'
import importlib.util
try:
  import vgg_jax.train  # pylint: disable=unused-import
except ImportError as e:
  mods = ['jax', 'flax', 'optax', 'orbax.checkpoint', 'clu', 'ml_collections',
          'grain', 'tensorflow_datasets', 'tensorflow', 'absl', 'etils',
          'numpy', 'PIL']
  def absent(m):
    try:
      return importlib.util.find_spec(m) is None
    except ImportError:
      return True
  print(f'import vgg_jax.train failed ({e}); absent modules:',
        ' '.join(m for m in mods if absent(m)) or 'none of the usual')
PYTHON
}

command -v "$py" >/dev/null 2>&1 || die "no Python interpreter '$py'."

if ((smoke)); then
  export JAX_PLATFORMS=cpu
elif ! has_gpu_jax; then
  echo "gpu.sh: JAX with GPU support is not importable by $py;" \
    "trying: pip install -e '.[cuda]'" >&2
  pip_install -e "${root}[cuda]" ||
    die "pip install -e '.[cuda]' failed (no network?). Install jax with" \
      "CUDA (pip install 'jax[cuda12]' or 'jax[cuda13]') or point PYTHON at" \
      "an interpreter that has it."
  has_gpu_jax ||
    die "$py still sees no GPU through JAX: check nvidia-smi and" \
      "'$py -c \"import jax; print(jax.devices())\"'."
fi

problem=$(import_problem)
if [[ -n $problem ]]; then
  echo "gpu.sh: $problem; trying: pip install -e ." >&2
  # No [cuda] extra here: the JAX already installed must stay.
  pip_install -e "$root" ||
    die "pip install -e . failed (no network?): $problem. Install the" \
      "project's dependencies (pip install -e . on a networked machine, or" \
      "set WHEELHOUSE to a folder of wheels) and rerun."
  problem=$(import_problem)
  [[ -z $problem ]] || die "still failing after pip install: $problem."
fi

if ((smoke)); then
  args=(--models=vgg16 --batch_size=2 --image_size=32 --width_multiplier=0.0625
    --steps=2 --warmup=1 --matmul_size=256 --dtype=bfloat16 --peers=none
    --load_retries=0)
else
  args=(--models=vgg16 --batch_size="${BATCH:-256}" --dtype=bfloat16
    --peers=none --require_accelerator --load_retries=0)
fi

# -u: progress lines appear as they happen; TF_CPP_MIN_LOG_LEVEL quiets the
# TensorFlow that clu imports.
TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} \
  "$py" -u benchmarks/train_step.py "${args[@]}" \
  --peak_tflops="${PEAK_TFLOPS:-989}" ${extra[@]+"${extra[@]}"}
