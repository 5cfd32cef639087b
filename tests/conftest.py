"""Shared fixtures: tiny decoder models built from configs (no network), and `assert_close`."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# commands run in this process (and the CLIs the tests start) leave the allocator as it is: tests/test_cpu_memory.py
os.environ.setdefault("HF_FAM_SYSTEM_MALLOC", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import transformers  # noqa: E402

FAMILIES = ("llama", "mistral", "gemma")

from hf_fam import tiny  # noqa: E402

# the tests' sizes: hf_fam.tiny's, with a vocabulary of 101 and 512 positions
TEST_SIZES = {"vocab_size": 101, "max_position_embeddings": 512}


def tiny_config(family: str = "llama", **overrides) -> transformers.PretrainedConfig:
    """A tiny config of `family` (hidden 64, 2 layers, GQA 4/2 heads, vocab 101): `hf_fam.tiny.tiny_config`."""
    return tiny.tiny_config(family, **{**TEST_SIZES, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", sharpen: float = 4.0, **overrides):
    """A tiny causal LM in fp32 eval mode, deterministic for `seed` (`hf_fam.tiny.tiny_model`).

    `sharpen` scales the query/key projections so that attention is far from uniform: with random
    weights, which keys are masked would otherwise barely change the output.
    """
    return tiny.tiny_model(family, seed, attn=attn, sharpen=sharpen, **{**TEST_SIZES, **overrides}).eval()


def load_script(relative: str):
    """A benchmark or script of this repository (e.g. "benchmarks/real_finetune.py") as a fresh module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 101) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def padding_mask(lengths: list[int], total: int, side: str = "right") -> torch.Tensor:
    """(B, total) 0/1 mask with each row's `lengths[b]` real tokens on the left ("right" padding) or right."""
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, total - n :] = 1
    return mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, mask: torch.Tensor | None = None,
                 msg: str = ""):
    """Max-abs-difference check that reports the difference; `mask` (B, N) restricts to real tokens."""
    assert actual.shape == expected.shape, f"{msg} shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs()
    if mask is not None:
        diff = diff * mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim())))
    worst = diff.max().item() if diff.numel() else 0.0
    assert worst <= atol, f"{msg} max abs difference {worst:.3e} > {atol:.1e}"
    return worst


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that run the demo or the benchmarks set torch's thread count for the process; restore it, or
    later tests that compare logits against a fresh process would reduce in another order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub (`hub_helpers.FakeHub`) in place of `huggingface_hub.HfApi`, the default api= of pushing."""
    from hub_helpers import FakeHub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *args, **kwargs: fake)
    return fake
