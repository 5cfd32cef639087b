"""What a FAM forward returns besides logits: `output_hidden_states=True` gives the tokens' hidden states of every
layer (never the FAM's), exact against the unmodified model with FAM off and the same in every schedule with FAM
on; `output_attentions=True` is refused in one line (a FAM layer attends over its memory and the last blocks, which
no tokens x tokens matrix holds; transformers would otherwise return an empty tuple without a word);
`return_dict=False` gives the output's tuple (the family's fields, then the final FAM), as transformers does."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from transformers import AutoModelForSequenceClassification

import hf_fam
from hf_fam.modeling.fam_forward import NO_ATTENTION_WEIGHTS

C, M, F = 4, 1, 3


def fam_model(base, fam_length=F, block_size=C, memory_segments=M):
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=block_size, memory_segments=memory_segments,
                                                 fam_length=fam_length).eval()


def hidden_states(model, ids, **kwargs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True, **kwargs).hidden_states


def test_hidden_states_with_fam_off_are_the_unmodified_models(family):
    base = tiny_model(family)
    ids = random_ids(2, 19, seed=5)
    expected = hidden_states(base, ids)
    got = hidden_states(fam_model(base, fam_length=0, block_size=19, memory_segments=0), ids)
    assert len(got) == len(expected) == base.config.num_hidden_layers + 1
    for layer, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, msg=f"{family} hidden state {layer}")


def test_hidden_states_are_the_tokens_and_agree_across_schedules(family):
    model = fam_model(tiny_model(family))
    ids = random_ids(2, 6 * C + 3, seed=6)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    parallel = out.hidden_states
    assert len(parallel) == model.config.base_config.num_hidden_layers + 1
    assert all(h.shape == (2, ids.shape[1], model.config.base_config.hidden_size) for h in parallel)  # no FAM rows
    for chunk in (1, 7):
        cache, pieces = None, []
        for s in range(0, ids.shape[1], chunk):
            with torch.no_grad():
                step = model(ids[:, s : s + chunk], cache=cache, use_cache=True, output_hidden_states=True)
            cache = step.cache
            pieces.append(step.hidden_states)
        for layer in range(len(parallel)):
            streamed = torch.cat([p[layer] for p in pieces], dim=1)
            assert_close(streamed, parallel[layer], msg=f"{family} chunk={chunk} hidden state {layer}")
    # the memory reaches the hidden states: without it the later blocks differ
    no_memory = hidden_states(fam_model(tiny_model(family), fam_length=0), ids)
    assert not torch.allclose(no_memory[-1][:, 2 * C :], parallel[-1][:, 2 * C :], atol=1e-3)


def test_hidden_states_of_a_padded_batch_are_each_rows_alone():
    model = fam_model(tiny_model("llama"))
    ids = random_ids(3, 17, seed=7)
    mask = padding_mask([17, 11, 5], 17, "left")
    batched = hidden_states(model, ids, attention_mask=mask)
    for row, n in enumerate([17, 11, 5]):
        alone = hidden_states(model, ids[row : row + 1, 17 - n :])
        for layer in range(len(batched)):
            assert_close(batched[layer][row : row + 1, 17 - n :], alone[layer], msg=f"row {row} hidden state {layer}")


def _classifier():
    lm = tiny_model("llama")
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 2, 0
    classifier = AutoModelForSequenceClassification.from_config(config)
    return hf_fam.FAMForSequenceClassification.from_base_model(classifier, block_size=C, memory_segments=M,
                                                               fam_length=F).eval()


MODELS = {
    "FAMForCausalLM": lambda: fam_model(tiny_model("llama")),
    "patched": lambda: hf_fam.patch(tiny_model("llama"), block_size=C, memory_segments=M, fam_length=F).eval(),
    "FAMForSequenceClassification": _classifier,
    "eager": lambda: fam_model(tiny_model("llama", attn="eager")),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_attention_weights_are_refused_in_one_line(kind):
    model = MODELS[kind]()
    ids = random_ids(1, 9, seed=8).clamp(min=1)
    with pytest.raises(ValueError) as info:
        model(ids, output_attentions=True)
    assert str(info.value) == NO_ATTENTION_WEIGHTS and "\n" not in NO_ATTENTION_WEIGHTS
    with torch.no_grad():
        assert model(ids, output_attentions=False).attentions is None  # asking for none still runs


def test_generate_asking_for_attention_weights_is_refused():
    model = fam_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="do not return attention weights"):
        model.generate(random_ids(1, 9, seed=8), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       output_attentions=True, return_dict_in_generate=True)


def _tagger():
    from transformers import AutoModelForTokenClassification

    lm = tiny_model("llama")
    config = copy.deepcopy(lm.config)
    config.num_labels = 3
    return hf_fam.FAMForTokenClassification.from_base_model(AutoModelForTokenClassification.from_config(config),
                                                            block_size=C, memory_segments=M, fam_length=F).eval()


def _backbone():
    """A FAM backbone standing alone (`AutoModel`), random weights."""
    from conftest import tiny_config

    config = hf_fam.FAMConfig(base_config=tiny_config("llama"), block_size=C, memory_segments=M, fam_length=F)
    return hf_fam.FAMModel(config).eval()


TUPLE_MODELS = {**MODELS, "FAMForTokenClassification": _tagger, "FAMModel": _backbone}


def _same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b)  # a FAMCache: a new one each call


@pytest.mark.parametrize("kind", sorted(TUPLE_MODELS))
def test_return_dict_false_gives_the_outputs_tuple(kind):
    """transformers' tuple form: the output's fields that are set, in order; the final FAM after the family's own
    (a FAM output used to fail to take the tuple: "'tuple' object does not support item assignment")."""
    model = TUPLE_MODELS[kind]()
    ids = random_ids(2, 11, seed=9).clamp(min=1)
    calls = [dict(), dict(use_cache=True)]
    if "Causal" in kind or kind == "patched":
        calls.append(dict(labels=ids))
    for kwargs in calls:
        with torch.no_grad():
            as_dict = model(ids, **kwargs)
            as_tuple = model(ids, return_dict=False, **kwargs)
        assert isinstance(as_tuple, tuple) and _same(as_tuple, as_dict.to_tuple()), (kind, kwargs)
        assert list(as_dict.keys())[-1] == "fam_state" and _same(as_tuple[-1], as_dict.fam_state)
    if kind != "patched":  # the family's own head fails so ("'tuple' object has no attribute 'last_hidden_state'")
        model.config.return_dict = False  # the config's default, as transformers reads it
        with torch.no_grad():
            assert isinstance(model(ids), tuple)
