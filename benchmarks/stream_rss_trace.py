"""Resident memory while FAM reads a long stream, chunk by chunk: does it grow, or level off?

Same model as `benchmarks/stream.py` (Llama hidden 256, 4 layers, fp32; C = 256, M = 1, F = 16), 4k-token
chunks through the cache; prints tokens read, the process's peak RSS (VmHWM) and current RSS (VmRSS) every
64k tokens (Linux).

    python benchmarks/stream_rss_trace.py [TOKENS]        # default 1,048,576
"""

from __future__ import annotations

import sys
import time

import torch

from hf_fam.apps.bench import BenchConfig, build, proc_status_mib


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_048_576
    config = BenchConfig(hidden=256, layers=4, heads=4, vocab=1000, block_size=256, memory_segments=1,
                         fam_length=16, chunk=4096)
    torch.set_num_threads(config.threads)
    model = build("fam", config)
    ids = torch.randint(0, config.vocab, (1, n), generator=torch.Generator().manual_seed(n))
    cache, t0 = None, time.perf_counter()
    print("tokens  peak_MiB  rss_MiB  seconds")
    with torch.inference_mode():
        for i, start in enumerate(range(0, n, config.chunk)):
            cache = model(ids[:, start : start + config.chunk], cache=cache, use_cache=True, logits_to_keep=1).cache
            if i % 16 == 0 or start + config.chunk >= n:
                peak, rss = proc_status_mib("VmHWM"), proc_status_mib("VmRSS")
                print(f"{min(n, start + config.chunk):>7}  {peak:>8.0f}  {rss:>7.0f}  "
                      f"{time.perf_counter() - t0:7.1f}", flush=True)


if __name__ == "__main__":
    main()
