"""Generation modes that need to roll the cache back (assisted / prompt-lookup decoding, contrastive search) and
continuous batching (a paged KV cache) cannot run a FAM model's recurrent memory: each is refused with one line
before a token is produced, for FAMForCausalLM, a patched model, and a checkpoint loaded as remote code where hf_fam is
not installed (there, with the refusal of attention weights, tests/test_model_outputs.py).
(transformers 5.24 alone refuses assisted decoding only after the prefill, sends contrastive search to the Hub, and
returns no tokens from continuous batching after logging an error.)"""

from __future__ import annotations

import pytest
import torch
from client_helpers import fam_checkpoint
from conftest import tiny_model
from convert_helpers import run_without_hf_fam
from transformers import AutoModelForCausalLM
from transformers.generation.configuration_utils import GenerationMode

import hf_fam
from hf_fam.modeling.fam_generation import unsupported_generation_error

REFUSED = {
    "assisted": lambda assistant: dict(assistant_model=assistant),
    "prompt_lookup": lambda assistant: dict(prompt_lookup_num_tokens=3),
    "early_exit": lambda assistant: dict(assistant_early_exit=1),
    "contrastive": lambda assistant: dict(penalty_alpha=0.6, top_k=4),
    "contrastive_remote": lambda assistant: dict(penalty_alpha=0.6, top_k=4, trust_remote_code=True),
    "paged": lambda assistant: dict(cache_implementation="paged"),
}


def _prompt():
    g = torch.Generator().manual_seed(3)
    return torch.randint(5, 90, (1, 21), generator=g)  # away from pad (0) and EOS ids


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = fam_checkpoint(tmp_path_factory.mktemp("gen") / "fam")
    return {
        "folder": folder,
        "FAMForCausalLM": AutoModelForCausalLM.from_pretrained(folder).eval(),
        "patched": hf_fam.patch(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=3).eval(),
    }


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
@pytest.mark.parametrize("mode", sorted(REFUSED))
def test_modes_that_need_a_roll_back_are_refused_in_one_line(models, kind, mode):
    model = models[kind]
    assistant = tiny_model("llama", seed=1, vocab_size=model.config.vocab_size)
    kwargs = REFUSED[mode](assistant)
    with pytest.raises(ValueError, match="FAM models do not support") as info:
        model.generate(_prompt(), max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert ("paged" in message) == (mode == "paged"), message


def test_generate_batch_is_refused(models):
    with pytest.raises(ValueError, match="continuous batching"):
        models["FAMForCausalLM"].generate_batch([[5, 6, 7, 8]])


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_greedy_sampling_and_beams_still_run(models, kind):
    model = models[kind]
    prompt = _prompt()
    greedy = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    beams = model.generate(prompt, max_new_tokens=4, do_sample=False, num_beams=3, pad_token_id=0)
    sample = model.generate(prompt, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    for out in (greedy, beams, sample):
        assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt)


def test_exactly_the_roll_back_modes_are_refused():
    refused = {mode for mode in GenerationMode if unsupported_generation_error(mode) is not None}
    assert refused == {GenerationMode.ASSISTED_GENERATION, GenerationMode.CONTRASTIVE_SEARCH}
    assert unsupported_generation_error("not a mode") is None


def test_remote_code_refuses_the_same_modes(models, tmp_path):
    """The refusal ships with the checkpoint: loaded with trust_remote_code where hf_fam cannot be imported."""
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(models["folder"])!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        prompt = torch.arange(5, 26)[None]
        print("greedy", model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0).shape[1])
        for kwargs in ({{"prompt_lookup_num_tokens": 3}}, {{"penalty_alpha": 0.6, "top_k": 4}},
                       {{"cache_implementation": "paged"}},
                       {{"output_attentions": True, "return_dict_in_generate": True}}):
            try:
                model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)
                print("ran", kwargs)
            except ValueError as e:
                print("refused", str(e).split(":")[0])
    """
    result = run_without_hf_fam(script, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "greedy 25", result.stdout
    assert lines[1:] == ["refused FAM models do not support assisted / speculative decoding (assistant_model, "
                         "prompt_lookup_num_tokens, assistant_early_exit, use_mtp)",
                         "refused FAM models do not support contrastive search (penalty_alpha with top_k > 1)",
                         "refused FAM models do not support continuous batching (cache_implementation='paged', "
                         "generate_batch)",
                         "refused FAM models do not return attention weights (output_attentions=True)"], result.stdout
