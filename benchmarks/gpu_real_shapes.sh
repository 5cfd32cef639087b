#!/usr/bin/env bash
# One prepared run on a CUDA machine for the real-shape targets (docs/performance.md, "Real shapes"): the CUDA
# equivalence checks (benchmarks/cuda_checks.py, with two layers of the 1B shape at C=1024 M=3 F=64), then
# `hf-fam bench --preset llama-3.2-1b-gpu` (Llama-3.2-1B shape, random weights, bf16, C=1024 M=3 F=64: prefill at
# batch 1 and 8 in chunks of 8 blocks and in one forward, decode, LoRA r=64 training step), medians of 2 interleaved
# rounds. Sized from the first H200 run (docs/performance.md): about 25 s of checks, then about 175 s of prefill,
# 40 s of decode and 170 s of LoRA steps, within 10 minutes. The benchmark saves each row as it is measured and
# runs the LoRA steps last, so a run stopped by its time limit loses the longest step first. The bench's limit is
# what the steps before it left of TOTAL_SECONDS (570).
# Between them, benchmarks/gpu_profile_chain.py profiles one 8k read at batch 1 and 8 (about 30 s), and
# benchmarks/decode_host.py times decoding at the 1B layer count and a tiny width (host time per token, about 20 s),
# and benchmarks/train_chain.py times the LoRA step at 8k with the chain recorded by autograd, recomputed in
# backward, and recomputed with CUDA graphs (about 40 s; cuda_checks.py checks the last one's gradients first).
# PARTS chooses the bench's parts (default: prefill decode train).
# Results go to ${OUT:-benchmarks/results/gpu_real} (8 files: run.log, cuda_checks.json, profile.json,
# decode_host.json, train_chain.json, llama-3.2-1b-gpu.json, .md and _prefill.png). Wheels in .whl/ (the transformers and peft
# releases tested here) are installed to /tmp/site first, where the machine's own differ.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_real}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  # a carried release that cannot import there (a dependency too old) gives way to the machine's own
  PYTHONPATH=/tmp/site python3 -c 'import transformers, peft' 2>/dev/null || { echo "carried wheels do not import; \
using the machine's transformers and peft"; export PYTHONPATH=$PWD; }
else
  export PYTHONPATH=$PWD
fi
# the host allocator is irrelevant to GPU timings: leave glibc's as it is
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_FAM_ALLOCATOR=system
LOG=$OUT/run.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$LOG"
timeout "${CHECK_SECONDS:-90}" python3 benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
timeout "${PROFILE_SECONDS:-60}" python3 benchmarks/gpu_profile_chain.py --out "$OUT/profile.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
timeout "${DECODE_HOST_SECONDS:-60}" python3 benchmarks/decode_host.py --device cuda --context 8192 \
  --out "$OUT/decode_host.json" 2>&1 | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
timeout "${TRAIN_CHAIN_SECONDS:-60}" python3 benchmarks/train_chain.py --device cuda --width real --dtype bfloat16 \
  --rank 64 --tokens 8192 --rounds 3 --out "$OUT/train_chain.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
# the bench gets what is left of TOTAL_SECONDS (default 570: the run's 10 minutes less the copy back), so the
# whole script ends inside the device's per-command limit even when every step above ran to its timeout
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
(( left < 60 )) && left=60
# shellcheck disable=SC2086
timeout "${BENCH_SECONDS:-$left}" python3 -m hf_fam.cli bench --preset llama-3.2-1b-gpu --threads 8 --rounds 2 \
  --parts ${PARTS:-prefill decode train} --out "$OUT/llama-3.2-1b-gpu" 2>&1 | tee -a "$LOG"
echo "bench exit status: ${PIPESTATUS[0]} (124: stopped by its time limit)" | tee -a "$LOG"
