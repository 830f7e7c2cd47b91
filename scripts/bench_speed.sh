#!/usr/bin/env bash
# The headline speed numbers: cpuft against plain TRL on a ~95M-parameter Llama (built offline).
# Run on a quiet machine; every number in docs/speed.md comes from bench-results/*/bench.json.
#   scripts/bench_speed.sh            all three variants, 3 interleaved repeats (slow: TRL's
#                                     defaults run bf16-emulated + checkpointing on AVX2 CPUs)
#   QUICK=1 scripts/bench_speed.sh    trl_tuned vs cpuft only, 1 repeat
#   SIZE=qwen0.5b scripts/bench_speed.sh   Qwen2.5-0.5B's shapes: trl_best vs cpuft, 2 repeats
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ -n "${SIZE:-}" ]]; then
  cpuft bench --size "$SIZE" --variants trl_best,cpuft --repeats 2 --out "bench-results/$SIZE" "$@"
elif [[ "${QUICK:-0}" == 1 ]]; then
  cpuft bench --size 100m --variants trl_tuned,cpuft --repeats 1 --out bench-results/100m-quick "$@"
else
  cpuft bench --size 100m --repeats 3 --out bench-results/100m "$@"
fi
# On an AMX machine also record which oneDNN kernels ran (bf16 vs fp32 is added automatically):
#   cpuft bench --size 100m --variants trl_tuned,cpuft --onednn-verbose bench-results/onednn.log
#   grep -c avx512_core_amx bench-results/onednn.log
