#!/usr/bin/env bash
# Every benchmark in full mode, one after the other (never in parallel: they would time each other), tables to
# OUT (default bench/results/latest.md) and each report's JSON beside it. About 20–30 min on 2 idle CPU cores.
#
#   bench/run_all.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/latest.md}"
dir="$(dirname "$out")"
mkdir -p "$dir"
# An ImageNet 64-shaped model small enough to train on a CPU: the full model's resolution, levels
# (1, 2, 3, 4) and attention at 32/16/8, at ch 32 with one res block per level.
small=(--config=configs/imagenet64.py --config.model.ch=32 --config.model.num_res_blocks=1
       --config.model.emb_ch=128)
run() { echo "\$ python $*" | tee -a "$out"; python "$@" 2>&1 | grep -v -e '^I[0-9]' -e 'libtpu' | tee -a "$out"; }

{
  echo "# bench/run_all.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, git $(git rev-parse --short HEAD)"
  echo
} > "$out"
run bench/train_throughput.py --config=configs/digits.py --kinds=teacher,stage_one,round \
    --json="$dir/train_digits.json"
run bench/train_throughput.py "${small[@]}" --config.teacher.batch_size=8 --config.distill.batch_size=8 \
    --steps=3 --repeats=3 --full_model= --json="$dir/train_imagenet64_small.json"
run bench/sampling_throughput.py --config=configs/digits.py --json="$dir/sampling_digits.json"
run bench/sampling_throughput.py "${small[@]}" --batch=8 --repeats=3 --json="$dir/sampling_imagenet64_small.json"
run bench/input_pipeline.py "${small[@]}" --json="$dir/input_imagenet64.json"
run bench/scaling.py --config=configs/digits.py --json="$dir/scaling_digits.json"
# The configs' own Adam (eps 1e-8) amplifies reduction-order noise (bench/scaling.py): expected to miss 1e-5.
run bench/scaling.py --config=configs/digits.py --adam_eps=0 --json="$dir/scaling_digits_adam_eps_1e-8.json" \
    || echo "(scaling with the configs' Adam eps missed the tolerance, as expected)" | tee -a "$out"
echo "wrote $out"
