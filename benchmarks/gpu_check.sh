#!/usr/bin/env bash
# The one prepared GPU run for issue 11 (an H100/H200 session's device time is scarce): SD1.5 at real size,
# the SPO round in both structures in the same run, then the SPM step; SDXL last, if time is left.
# Writes JSON under ${OUT:-benchmarks/results}. Needs the CUDA torch build and the package installed.
set -euo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python benchmarks/spo_round.py --device cuda --arch sd15 --prompts 10 --candidates 4 --rounds 2 --out "$out/spo_round_gpu_sd15.json"
python benchmarks/spm_step.py --device cuda --arch sd15 --batch 16 --steps 3 --out "$out/spm_step_gpu_sd15.json"
timeout 240 python benchmarks/spo_round.py --device cuda --arch sd15 --prompts 10 --candidates 4 --threshold 0.3 \
  --rounds 2 --out "$out/spo_round_gpu_sd15_threshold.json" || echo "threshold run skipped (time)"
