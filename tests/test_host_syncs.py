"""Where a FAM forward reads tensor values on the host: on CUDA each read waits for the device (a sync), and one
inside a layer stalls every later launch behind it (decoding at the 1B shape on an H200 is host-bound). The
forward reads what it needs while laying the chunk out; the layers' attention and the FAM chain read nothing.
Counted on the CPU with a TorchFunctionMode that sees every call that would sync on CUDA."""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import pytest
import torch
from conftest import padding_mask, random_ids
from torch.overrides import TorchFunctionMode

import hf_fam
from hf_fam.modeling.modeling_fam import FAMForCausalLM
from hf_fam.tiny import tiny_model

PACKAGE = Path(hf_fam.__file__).resolve().parent
# calls that copy a tensor's value to the host (on CUDA: wait for the device)
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero", "allclose"}


class HostReads(TorchFunctionMode):
    """Records each host read as (name, the hf_fam line that asked for it or "" (transformers' own), whether inside
    a layer's attention)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            stack = traceback.extract_stack()[:-1]
            in_layer = any(f.name == "fam_attention_forward" for f in stack)
            caller = stack[-1]  # the line that asked for the value
            # inside the package's folder: a path merely containing "hf_fam" (a virtual environment named after
            # the project) would count transformers' own reads as ours
            path = Path(caller.filename).resolve()
            ours = f"{path.name}:{caller.lineno}" if PACKAGE in path.parents else ""
            self.reads.append((name, ours, in_layer))
        return func(*args, **(kwargs or {}))

    def ours(self) -> list[tuple[str, str, bool]]:
        return [r for r in self.reads if r[1]]


def _model(family="llama", F=2):
    return FAMForCausalLM.from_base_model(tiny_model(family), block_size=4, memory_segments=1, fam_length=F).eval()


@pytest.mark.parametrize("F", [0, 2])
def test_layers_read_nothing_on_the_host(F):
    model = _model(F=F)
    ids = random_ids(2, 19, seed=3)
    mask = padding_mask([19, 15], 19, "left")
    with torch.no_grad(), HostReads() as reads:
        out = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)  # prefill: a chain over 2 blocks
        cache = out.cache
        for s in range(9, 19):  # decoding, inside blocks and across their boundaries
            cache = model(ids[:, s : s + 1], attention_mask=mask[:, : s + 1], cache=cache, use_cache=True).cache
    assert reads.ours(), "the counter saw nothing: it would pass whatever the code does"
    assert [r for r in reads.reads if r[2]] == []


def test_a_decoding_step_reads_the_host_twice():
    # one read for the checks of the step's mask and positions, one for the plan's block counts
    model = _model()
    ids = random_ids(2, 11, seed=4)
    mask = padding_mask([11, 8], 11, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True).cache
        with HostReads() as reads:
            model(ids[:, 10:], attention_mask=mask, position_ids=positions[:, 10:], cache=copy.deepcopy(cache),
                  use_cache=True)
    assert len(reads.ours()) == 2, reads.ours()
