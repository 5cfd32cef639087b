#!/usr/bin/env bash
# One prepared run on a CUDA machine: the CUDA equivalence checks, then the benchmark suite (fp32 and bf16;
# the FAM chain from CUDA graphs, the default), fp32 prefill with the chain run eagerly for comparison, prefill
# in one forward (graphs on and off), and the paper's C = 1024, M = 3, F = 64.
# Results go to ${OUT:-benchmarks/results/gpu}. Where transformers is not the pinned release, a wheel of it
# in .whl/ is installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json" 2>&1 | tee "$OUT/cuda_checks.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --full-max-length 65536 --out "$OUT/suite_fp32" 2>&1 \
  | tee "$OUT/suite_fp32.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --parts prefill --no-cuda-graphs --rounds 2 \
  --prefill-lengths 4096 16384 65536 --full-max-length 65536 --out "$OUT/suite_fp32_eager_chain" 2>&1 \
  | tee "$OUT/suite_fp32_eager_chain.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --dtype bfloat16 --parts prefill train decode \
  --full-max-length 65536 --out "$OUT/suite_bf16" 2>&1 | tee "$OUT/suite_bf16.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --parts prefill --chunk 0 --rounds 2 \
  --prefill-lengths 16384 65536 --full-max-length 65536 --out "$OUT/suite_fp32_one_forward" 2>&1 \
  | tee "$OUT/suite_fp32_one_forward.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --parts prefill --chunk 0 --rounds 2 --no-cuda-graphs \
  --prefill-lengths 16384 65536 --full-max-length 65536 --out "$OUT/suite_fp32_one_forward_eager_chain" 2>&1 \
  | tee "$OUT/suite_fp32_one_forward_eager_chain.log"
python3 -m hf_fam.cli bench --device cuda --threads 8 --parts prefill train --block-size 1024 --memory-segments 3 \
  --fam-length 64 --full-max-length 65536 --out "$OUT/suite_fp32_paper" 2>&1 | tee "$OUT/suite_fp32_paper.log"
