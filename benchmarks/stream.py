"""Streaming benchmark of the streaming issue: memory and decode latency after long contexts.

A preset of the suite (hf_fam/apps/bench.py): Llama hidden 256, 4 layers, fp32; C = 256, M = 1, F = 16; decode
ms/token after 1k, 32k, 256k and 1M tokens of context (FAM; the unmodified model up to 32k), and the peak
RSS of reading a 1M-token stream against reading 32k. Targets: peak RSS at 1M <= 1.1x that at 32k; decode
latency at 256k <= 1.1x that at 1k.

    python benchmarks/stream.py [--out benchmarks/results/stream] [any `hf-fam bench` option]
"""

from __future__ import annotations

import sys

from hf_fam.cli import main

PRESET = ["--parts", "decode", "stream", "--hidden", "256", "--layers", "4", "--heads", "4", "--vocab", "1000",
          "--block-size", "256", "--memory-segments", "1", "--fam-length", "16",
          "--decode-contexts", "1024", "32768", "262144", "1048576", "--full-max-length", "32768",
          "--stream-tokens", "1048576", "--decode-steps", "300", "--out", "benchmarks/results/stream"]

if __name__ == "__main__":
    sys.exit(main(["bench", *PRESET, *sys.argv[1:]]))
