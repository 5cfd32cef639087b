#!/usr/bin/env bash
# One prepared run on a CUDA machine for the real-shape targets (docs/performance.md, "Real shapes"), within the
# device's 10-minute command limit (TOTAL_SECONDS, 570, leaves time to copy the results back):
# 1. the CUDA equivalence checks (benchmarks/cuda_checks.py: the families, CUDA graphs, fused attention, two layers
#    of the 1B shape at C=1024 M=3 F=64, the training chain, and the chain's graph steps compiled with
#    torch.compile), up to CHECK_SECONDS (210);
# 2. benchmarks/gpu_compile_ab.py: FAM with plain graph steps (updates alone, and in groups: the default) and with
#    compiled ones against BSWA at the 1B shape, bf16 (batch 1 at 16k and 64k, batch 8 at 8k; one layer's update
#    step replayed alone), up to COMPILE_AB_SECONDS (150). Where compiling paid in every row measured and step 1
#    passed, the bench below runs with --compile-chain;
# 3. benchmarks/train_chain.py: the LoRA step at 8k with the chain recorded by autograd, recomputed in backward,
#    and recomputed with CUDA graphs, against BSWA (about 40 s), up to TRAIN_CHAIN_SECONDS (60);
# 4. benchmarks/decode_host.py: decoding's host time at the 1B layer count (about 20 s), up to DECODE_HOST_SECONDS
#    (40); benchmarks/gpu_profile_chain.py (the kernels outside graphs of one 8k read) only where PROFILE_SECONDS is
#    set;
# 5. `hf-fam bench --preset llama-3.2-1b-gpu` (random weights, bf16, C=1024 M=3 F=64: prefill at batch 1 and 8 in
#    chunks of 8 blocks and in one forward, the LoRA r=64 training step, decode), medians of 2 interleaved rounds,
#    with what is left of TOTAL_SECONDS. It saves each row as it is measured, in the order of PARTS (default:
#    prefill train decode; decode was flat in both H200 sessions), so a run stopped by its limit keeps what it
#    measured.
# Results go to ${OUT:-benchmarks/results/gpu_real} (run.log, cuda_checks.json, compile_ab.json, train_chain.json,
# decode_host.json, [profile.json,] llama-3.2-1b-gpu.json, .md and _prefill.png). Wheels in .whl/ (the transformers
# and peft releases tested here) are installed to /tmp/site first, where the machine's own differ.
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
timeout "${CHECK_SECONDS:-210}" python3 benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
checks=${PIPESTATUS[0]}
echo "cuda_checks exit status: $checks" | tee -a "$LOG"
timeout "${COMPILE_AB_SECONDS:-150}" python3 benchmarks/gpu_compile_ab.py --out "$OUT/compile_ab.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" -e "^W[0-9]" | tee -a "$LOG"
compile_flag=""
if [[ $checks == 0 ]] && python3 -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["compiled_pays"])' \
    "$OUT/compile_ab.json" 2>/dev/null; then
  compile_flag="--compile-chain"
fi
echo "bench with compiled graph steps: ${compile_flag:-no}" | tee -a "$LOG"
timeout "${TRAIN_CHAIN_SECONDS:-60}" python3 benchmarks/train_chain.py --device cuda --width real --dtype bfloat16 \
  --rank 64 --tokens 8192 --rounds 3 --out "$OUT/train_chain.json" 2>&1 \
  | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
timeout "${DECODE_HOST_SECONDS:-40}" python3 benchmarks/decode_host.py --device cuda --context 8192 \
  --out "$OUT/decode_host.json" 2>&1 | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
if [[ -n ${PROFILE_SECONDS:-} ]]; then
  timeout "$PROFILE_SECONDS" python3 benchmarks/gpu_profile_chain.py --out "$OUT/profile.json" 2>&1 \
    | grep -v -e FutureWarning -e "warnings.warn" | tee -a "$LOG"
fi
# the bench gets what is left of TOTAL_SECONDS, so the whole script ends inside the device's per-command limit
# even when every step above ran to its timeout
left=$(( ${TOTAL_SECONDS:-570} - SECONDS ))
(( left < 60 )) && left=60
# shellcheck disable=SC2086
timeout "${BENCH_SECONDS:-$left}" python3 -m hf_fam.cli bench --preset llama-3.2-1b-gpu --threads 8 --rounds 2 \
  --parts ${PARTS:-prefill train decode} $compile_flag --out "$OUT/llama-3.2-1b-gpu" 2>&1 | tee -a "$LOG"
echo "bench exit status: ${PIPESTATUS[0]} (124: stopped by its time limit)" | tee -a "$LOG"
