#!/usr/bin/env bash
# One prepared run on a CUDA machine for the real-shape targets (docs/performance.md, "Real shapes"): the CUDA
# equivalence checks, then `hf-fam bench --preset llama-3.2-1b-gpu` (Llama-3.2-1B shape, random weights, bf16,
# C=1024 M=3 F=64: prefill at batch 1 and 8 in chunks of 8 blocks and in one forward, LoRA r=64 training step,
# decode), sized to finish within 10 minutes on one H100/H200. Results go to ${OUT:-benchmarks/results/gpu_real}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_real}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 150 python3 benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json" 2>&1 | tail -5 | tee "$OUT/cuda_checks.log"
timeout 420 python3 -m hf_fam.cli bench --preset llama-3.2-1b-gpu --threads 8 --rounds 3 \
  --out "$OUT/llama-3.2-1b-gpu" 2>&1 | tee "$OUT/llama-3.2-1b-gpu.log"
