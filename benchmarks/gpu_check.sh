#!/usr/bin/env bash
# The one prepared GPU run for issue 11 (an H100/H200 session's device time is scarce): SD1.5 at real size,
# the SPO round in both structures in the same run, ours with the speed options and with fast scoring, the
# SPM step; SDXL last, if time is left. Writes JSON under ${OUT:-benchmarks/results}. Needs the CUDA torch
# build and the package installed.
set -euo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
round="python benchmarks/spo_round.py --device cuda --prompts 10 --candidates 4 --rounds 2"
$round --arch sd15 --out "$out/spo_round_gpu_sd15.json"
# the same maths, faster layout: channels-last; the 40 x̂0 decoded 8 at a time (memory)
$round --arch sd15 --structure ours --channels-last --decode-batch 8 --out "$out/spo_round_gpu_sd15_options.json"
# opt-in fast scoring: a TAESD-size AutoencoderTiny decodes what the SPM scores (other pairs: speed only)
$round --arch sd15 --structure ours --scoring-decoder tiny --out "$out/spo_round_gpu_sd15_tiny.json"
python benchmarks/spm_step.py --device cuda --arch sd15 --batch 16 --steps 3 --out "$out/spm_step_gpu_sd15.json"
# SDXL (MSPO, k = 2, 1024 px): 2 prompts, the decode 2 at a time
timeout 200 python benchmarks/spo_round.py --device cuda --arch sdxl --prompts 2 --candidates 2 --rounds 1 \
  --decode-batch 2 --out "$out/spo_round_gpu_sdxl.json" || echo "sdxl run skipped (time or memory)"
