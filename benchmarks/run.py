"""The benchmark suite's entry point (same as `hf-fam bench`); see hf_fam/apps/bench.py for what it measures.

    python benchmarks/run.py                          # everything, CPU defaults (about an hour on 2 cores)
    python benchmarks/run.py --parts prefill train --prefill-lengths 1024 4096 --rounds 2
    python benchmarks/run.py --device cuda --out benchmarks/results/suite_h100
"""

from __future__ import annotations

import sys

from hf_fam.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
