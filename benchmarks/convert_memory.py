"""Peak memory of `hf-fam convert` against the size of the largest shard (target: peak RSS ≤ 1.2 × largest shard).

Writes a Llama checkpoint of ≥ 1 GB with random bf16 weights straight to safetensors shards, one shard in memory
at a time (the model is never built), then measures, each in a fresh process started from this small one (peak
RSS from `wait4`: every page the process touched, imports included; the checkpoint is written in a child of its
own because Linux carries a parent's peak RSS over into the children it starts):

- `import`:   importing hf_fam.checkpoint_io.convert, torch and transformers only: the floor any conversion pays;
- `convert`:  `python -m hf_fam.cli convert SRC OUT` (byte streaming, `hf_fam.checkpoint_io.safetensors_io`);
- `naive`:    the same conversion with `safe_open(...).get_tensor` + `safetensors.torch.save_file` per shard, the
              obvious shard-by-shard approach, for comparison.

    python benchmarks/convert_memory.py                          # ~1.3 GB checkpoint in 400 MB shards
    python benchmarks/convert_memory.py --shard-mb 300 --layers 10 --workdir /big/disk --out /tmp/mem.json

Prints a table and writes JSON (default benchmarks/results/convert_memory.json). Needs ~4 × the checkpoint's size
free on disk under --workdir; everything it writes there is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ["--block-size", "1024", "--memory-segments", "3", "--fam-length", "64"]


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
        vocab_size=args.vocab, tie_word_embeddings=False, dtype="bfloat16",
    )


def write_checkpoint(folder: Path, args) -> dict:
    """Shards of at most --shard-mb MB, written one at a time with random bf16 weights, plus the index."""
    import torch
    from safetensors.torch import save_file

    from hf_fam.checkpoint_io.checkpoint import expected_tensors
    from hf_fam.tiny import byte_tokenizer

    config = llama_config(args)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    expected = expected_tensors(config, dtype=torch.bfloat16).tensors
    limit = args.shard_mb * 1e6
    shards, current, size = [], [], 0
    for name, t in expected.items():  # model order: embeddings, layer by layer, norm, head
        nbytes = t.dtype.itemsize
        for d in t.shape:
            nbytes *= d
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t.shape))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
                   for name, shape in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file for name, _ in shard})
        sizes.append((folder / file).stat().st_size)
        print(f"  wrote {file}: {sizes[-1] / 1e6:.0f} MB", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": len(shards), "largest_shard_bytes": max(sizes), "total_bytes": sum(sizes)}


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of a child process, from the kernel's own accounting."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, wall  # ru_maxrss is in KiB on Linux


def naive_convert(src: Path, out: Path) -> None:
    """Shard by shard with safe_open + save_file: each shard is held as tensors, then serialised."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    import hf_fam.checkpoint_io.convert  # noqa: F401  the same imports as `convert`, so both start from the same floor

    out.mkdir()
    files = sorted(src.glob("*.safetensors"))
    for i, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if i == len(files) - 1:
            tensors["fam.fam_init"] = torch.zeros(64, tensors[next(iter(tensors))].shape[-1], dtype=torch.bfloat16)
        save_file(tensors, out / path.name, metadata={"format": "pt"})
        del tensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=400, help="largest shard size in MB")
    p.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp folder)")
    p.add_argument("--no-naive", action="store_true", help="skip the safe_open + save_file comparison")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", default="benchmarks/results/convert_memory.json")
    p.add_argument("--child-naive", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--child-write", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_naive:
        naive_convert(Path(args.child_naive[0]), Path(args.child_naive[1]))
        return
    if args.child_write:
        print(json.dumps(write_checkpoint(Path(args.child_write), args)))
        return

    work = Path(tempfile.mkdtemp(prefix="fam-convert-memory-", dir=args.workdir))
    try:
        src = work / "src"
        print(f"writing the source checkpoint to {src}", flush=True)
        # in a child: a process's peak RSS carries over into the children it starts, so this one stays small
        shape = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
                 "--vocab", str(args.vocab), "--shard-mb", str(args.shard_mb)]
        written = subprocess.run([sys.executable, __file__, "--child-write", str(src), *shape], check=True,
                                 stdout=subprocess.PIPE, text=True)
        ckpt = json.loads(written.stdout.strip().splitlines()[-1])
        runs = {}
        runs["import"] = measure([sys.executable, "-c", "import hf_fam.checkpoint_io.convert, torch, transformers"])
        runs["convert"] = measure([sys.executable, "-m", "hf_fam.cli", "convert", str(src), str(work / "fam"),
                                   *SETTINGS, "--quiet"])
        if not args.no_naive:
            runs["naive"] = measure([sys.executable, __file__, "--child-naive", str(src), str(work / "naive")])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    largest = ckpt["largest_shard_bytes"]
    result = {
        "checkpoint": {**ckpt, "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                       "vocab": args.vocab, "dtype": "bfloat16"},
        "runs": {
            name: {"peak_rss_bytes": rss, "wall_s": round(wall, 2), "peak_over_largest_shard": round(rss / largest, 3),
                   "peak_above_import_bytes": rss - runs["import"][0]}
            for name, (rss, wall) in runs.items()
        },
        "target": "convert peak RSS <= 1.2 x largest shard",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"\ncheckpoint: {ckpt['total_bytes'] / 1e9:.2f} GB in {ckpt['shards']} shards, "
          f"largest {largest / 1e6:.0f} MB")
    print(f"{'process':<10} {'peak RSS':>10} {'÷ largest shard':>16} {'above import':>13} {'wall':>7}")
    for name, r in result["runs"].items():
        print(f"{name:<10} {r['peak_rss_bytes'] / 1e6:>7.0f} MB {r['peak_over_largest_shard']:>16.2f} "
              f"{r['peak_above_import_bytes'] / 1e6:>10.0f} MB {r['wall_s']:>6.1f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
