"""benchmarks/memory_drift.py, the block-by-block start of training in docs/training.md, on a tiny checkpoint:
every start is measured, and the figures hold what the computation guarantees; and the memory probe's causal
start (`--init-attention causal`) is memory_drift's prefix start."""

from __future__ import annotations

import json

from conftest import load_script

from hf_fam.tiny import make_tiny_checkpoint


def _script():
    return load_script("benchmarks/memory_drift.py")


def test_every_start_block_by_block(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "drift.json"
    script = _script()
    assert script.main(["--model", str(base), "--tokens", "160", "--block-size", "32", "--memory-segments", "1",
                        "--fam-length", "4", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["starts"]) == set(script.STARTS)
    for start in result["starts"].values():
        assert len(start["block_loss"]) == len(start["logit_change"]) == 5 == len(start["memory_norms"])
    sink, base_row = result["starts"]["sink"], result["base"]
    # within the window C·(M+1) the zero-shot start is the unmodified model (the JSON rounds to 3 decimals: equal
    # losses may round one step apart), and its memory never changes
    assert all(abs(a - b) <= 0.0010001 for a, b in zip(sink["block_loss"][:2], base_row["block_loss"][:2]))
    assert len({json.dumps(row) for row in sink["memory_norms"]}) == 1
    # the paper's update changes the memory block after block
    assert len({json.dumps(row) for row in result["starts"]["paper_content"]["memory_norms"]}) > 1


def test_the_probes_causal_start_is_the_base_models_reading_of_its_slots(monkeypatch):
    """memory_probe.py --init-attention causal and memory_drift.py's `paper_prefix` are the same start: the initial
    memory propagated with causal attention among its slots equals the base model's hidden states of the slots'
    tokens read as a prompt (positions -F..-1 against 0..F-1: the same relative offsets)."""
    import torch
    from conftest import random_ids, tiny_model

    import hf_fam
    from hf_fam.modeling import fam_chain

    base = tiny_model("llama").eval()
    slots = random_ids(1, 4, seed=1)
    with torch.no_grad():
        prefix = list(base(slots, output_hidden_states=True).hidden_states[: base.config.num_hidden_layers])
    fam_init = base.get_input_embeddings().weight.detach()[slots[0]].clone()
    model = hf_fam.FAMForCausalLM.from_base_model(base, block_size=4, memory_segments=1, fam_length=4,
                                                  fam_init=fam_init).eval()
    ids = random_ids(1, 19)
    with torch.no_grad():
        given = model(ids, fam_state=prefix).logits
        full = model(ids).logits
        monkeypatch.setattr(fam_chain.FAMStep, "attend", fam_chain.FAMStep.attend)  # put back after the test
        load_script("benchmarks/memory_probe.py").causal_initial_memory()
        causal = model(ids).logits
    assert (causal - given).abs().max().item() <= 1e-5
    assert (full - given).abs().max().item() > 1e-3  # full attention among the slots is another start
