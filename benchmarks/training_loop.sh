#!/usr/bin/env bash
# The quickstart's training loop against its own step in isolation, side by
# side: benchmarks/train_step.py on the quickstart config, then 3 epochs of
# training with validation off, printing each log line's images/s as a
# fraction of the isolated step's, and their means (epoch 1: 468 steps).
#
#   bash benchmarks/training_loop.sh [STEPS]     # default 1404 (3 epochs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${1:-1404}
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
export TF_CPP_MIN_LOG_LEVEL=2

isolated=$("$PYTHON" benchmarks/train_step.py --config=configs/quickstart.py \
  --peers=none --steps=50 --warmup=5 | awk -F'|' '/^\| vgg_jax/ {v=$9} END {gsub(/ /, "", v); print v}')
echo "isolated step: ${isolated} images/s"
"$PYTHON" -m vgg_jax.main --config=configs/quickstart.py --workdir="$WORKDIR/run" \
  --config.train.max_steps="$STEPS" --config.train.eval_every_steps=1000000 \
  --config.train.checkpoint_every_steps=1000000 --config.train.log_every_steps=100 2>&1 |
  grep -o 'step [0-9]*/[0-9]*: .* img/s (data wait [0-9]*%)' |
  awk -v iso="$isolated" '{for (i = 1; i <= NF; i++) if ($i == "img/s") ips = $(i - 1);
    printf "%s  %5.1f%% of the isolated step\n", $0, 100 * ips / iso;
    split($2, s, "/"); all += ips; n++; if (s[1] > 468) {late += ips; m++}}
    END {printf "mean of all %d lines: %.0f img/s, %.1f%% of the isolated step\n", n, all / n, 100 * all / n / iso;
         if (m) printf "mean after epoch 1 (%d lines): %.0f img/s, %.1f%%\n", m, late / m, 100 * late / m / iso}'
