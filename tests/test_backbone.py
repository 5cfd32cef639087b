"""FAM lives in the backbone: every way a client reaches a FAM model's decoder runs FAM.

TRL's fused-head path calls `model.base_model(...)`, lm-evaluation-harness and pipelines call the model,
PEFT wraps it: none of them may reach a bare decoder that silently runs full attention.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close, random_ids, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

import hf_fam
from hf_fam import FAMForCausalLM, FAMModel
from hf_fam.modeling.fam_compat import enable_checkpointing

SETTINGS = dict(block_size=4, memory_segments=1, fam_length=3, fam_update="paper")


def _models(family):
    """(kind, model) for each way of making a FAM causal LM; fam_init equal across them."""
    converted = FAMForCausalLM.from_base_model(tiny_model(family), **SETTINGS).eval()
    fam_init = converted.fam.fam_init.detach().clone()
    patched = hf_fam.patch(tiny_model(family), **SETTINGS, fam_init=fam_init).eval()
    return {"from_base_model": converted, "patched": patched}


@pytest.mark.parametrize("kind", ["from_base_model", "patched"])
def test_every_route_to_the_decoder_runs_fam(family, kind):
    model = _models(family)[kind]
    ids = random_ids(2, 19)
    with torch.no_grad():
        out = model(ids)
        for decoder in (model.model, model.base_model, model.get_decoder()):
            assert isinstance(decoder, FAMModel)
            hidden = decoder(ids)
            assert_close(model.lm_head(hidden.last_hidden_state), out.logits, atol=0.0)
            assert len(hidden.fam_state) == model.config.num_hidden_layers
            for a, b in zip(hidden.fam_state, out.fam_state):
                assert_close(a, b, atol=0.0)
        # and it is FAM, not the plain decoder: the window (C·(M+1) = 8) is far shorter than the input
        plain = tiny_model(family)(ids).logits
    assert (out.logits - plain).abs().max() > 1e-3


def test_converted_and_patched_models_run_the_same_forward(family):
    models = _models(family)
    ids = random_ids(2, 21, seed=3)
    with torch.no_grad():
        a = models["from_base_model"](ids, use_cache=True)
        b = models["patched"](ids, use_cache=True)
    assert_close(a.logits, b.logits, atol=0.0)
    assert type(a.cache).__name__ == type(b.cache).__name__ == "FAMCache"


def test_from_base_model_leaves_the_base_model_usable(family):
    base = tiny_model(family)
    ids = random_ids(1, 17)
    with torch.no_grad():
        before = base(ids).logits
        fam = FAMForCausalLM.from_base_model(base, **SETTINGS).eval()
        fam_logits = fam(ids).logits
        after = base(ids).logits  # the base model runs its own (full) attention again
        fam_again = fam(ids).logits
    assert type(base.model).__name__.endswith("Model") and not isinstance(base.model, FAMModel)
    assert_close(after, before, atol=0.0)
    assert_close(fam_again, fam_logits, atol=0.0)
    assert (fam_logits - before).abs().max() > 1e-3
    # the modules are shared, not copied
    assert fam.model.layers[0] is base.model.layers[0]


def test_base_model_shared_with_a_fam_model_keeps_its_padding_and_gradients(family):
    base = tiny_model(family)
    ids, mask = random_ids(2, 13, seed=5), torch.tensor([[1] * 13, [0] * 4 + [1] * 9])
    before = base(ids, attention_mask=mask).logits
    fam = FAMForCausalLM.from_base_model(base, **SETTINGS)
    enable_checkpointing(fam)
    fam.train()
    fam(ids, labels=ids).loss.backward()  # checkpointed layers are recomputed with FAM in backward
    base.eval()
    after = base(ids, attention_mask=mask).logits
    assert_close(after, before, atol=1e-6, mask=mask)


def test_a_decoder_layer_called_on_its_own_fails_clearly(tmp_path):
    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    patched = hf_fam.patch(tiny_model(), **SETTINGS)
    for m in (loaded, patched):
        hidden = torch.randn(1, 5, m.config.hidden_size)
        pos = m.model.rotary_emb(hidden, torch.arange(5)[None])
        with pytest.raises(RuntimeError, match="FAM attention was called without FAM state"):
            m.model.layers[0](hidden, position_embeddings=pos)


def test_backbone_loads_with_auto_model_and_keeps_fam_init(tmp_path):
    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS).eval()
    model.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, FAMModel)
    assert_close(backbone.fam.fam_init, model.fam.fam_init, atol=0.0)
    ids = random_ids(2, 15)
    with torch.no_grad():
        assert_close(backbone(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=0.0)


def test_backbone_loads_with_remote_code_where_hf_fam_cannot_be_imported(tmp_path):
    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS).eval()
    ids = random_ids(2, 15)
    with torch.no_grad():
        expected = model.model(ids).last_hidden_state
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_fam"] = None  # `import hf_fam` fails in this process
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "FAMModel" and type(model).__module__.startswith("transformers_modules")
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            print("DIFF", (model(ref["ids"]).last_hidden_state - ref["expected"]).abs().max().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("DIFF")[1]) == 0.0


def test_peft_trains_fam_init_through_the_backbone():
    from peft import LoraConfig, get_peft_model

    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["fam"]))
    ids = random_ids(2, 17)
    # the fused-head route TRL takes: the backbone, then the head
    hidden = peft_model.base_model.model.model(ids).last_hidden_state
    loss = peft_model.base_model.model.lm_head(hidden).float().logsumexp(-1).mean()
    loss.backward()
    trained = peft_model.base_model.model.fam.modules_to_save["default"].fam_init
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_a_fam_model_reports_an_unbounded_length(caplog):
    from transformers.utils import logging as hf_logging

    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS).eval()
    base_limit = model.config.base_config.max_position_embeddings
    assert model.config.max_position_embeddings > 2**40 > base_limit
    # generating past the base model's limit is fine for FAM and must not warn that it is not
    ids = random_ids(1, base_limit + 4)
    hf_logging.enable_propagation()
    try:
        with torch.no_grad(), caplog.at_level("WARNING"):
            out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        hf_logging.disable_propagation()
    assert out.shape[1] == base_limit + 6
    assert "maximum length" not in caplog.text


def test_training_a_model_in_its_zero_shot_sink_start_switches_to_the_paper_update(tmp_path):
    model = hf_fam.patch(tiny_model(), block_size=4, memory_segments=1, fam_length=3)  # patch starts as a sink
    assert model.fam_settings.fam_update == "sink"
    ids = random_ids(1, 13)
    with torch.no_grad():
        model(ids)  # inference in the sink start is what it is for
    assert model.fam_settings.fam_update == "sink"
    model.train()
    model(ids, labels=ids).loss.backward()  # a training forward runs, and trains, the paper's update
    assert model.fam_settings.fam_update == "paper"
    assert model.fam.fam_init.grad is not None and model.fam.fam_init.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    assert hf_fam.FAMForCausalLM.from_pretrained(tmp_path).fam_settings.fam_update == "paper"
