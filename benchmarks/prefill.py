"""Prefill benchmark of the FAM core issue: FAM vs BSWA (F = 0) vs the unmodified model (full attention).

A preset of the suite (hf_fam/apps/bench.py): Llama hidden 256, 4 layers, fp32; C = 256, M = 1, F = 16; N = 1k,
4k, 16k, each read in one forward. Targets: FAM <= 1.10x BSWA time; FAM >= 3x faster than full attention
at 16k.

    python benchmarks/prefill.py [--out benchmarks/results/prefill] [any `hf-fam bench` option]
"""

from __future__ import annotations

import sys

from hf_fam.cli import main

PRESET = ["--parts", "prefill", "--hidden", "256", "--layers", "4", "--heads", "4", "--vocab", "1000",
          "--block-size", "256", "--memory-segments", "1", "--fam-length", "16", "--chunk", "0",
          "--prefill-lengths", "1024", "4096", "16384", "--full-max-length", "16384",
          "--out", "benchmarks/results/prefill"]

if __name__ == "__main__":
    sys.exit(main(["bench", *PRESET, *sys.argv[1:]]))
