"""lm-evaluation-harness (`HFLM(pretrained=DIR, trust_remote_code=True)`, what `lm_eval --model hf` builds) on a FAM
checkpoint, with local tasks over a local jsonl file: its loglikelihoods and greedy continuations equal direct calls
of the FAM model, for contexts shorter and longer than the base config's `max_position_embeddings` (64 here). A FAM
model has no position limit, so lm-eval must not cut long contexts from the left (issue 15: a 300-token context
lost 48 tokens and its loglikelihood moved by 4.9e-2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from client_helpers import fam_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

BASE_POSITIONS = 64
DOCS = [  # contexts of 33 and 129 tokens (bytes); the window C(M+1) is 16
    {"context": "the quick brown fox jumps over th", "continuation": "e lazy dog"},
    {"context": "working memory lets a transformer carry information past its attention window; "
                "a feedback attention memory reads long input block", "continuation": " by block"},
]
GEN_TOKENS = 6

LL_TASK = """task: fam_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_TASK = """task: fam_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["QQQQ"]
  max_gen_toks: {gen}
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    folder = fam_checkpoint(root / "fam", max_position_embeddings=BASE_POSITIONS)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "fam_local_ll.yaml").write_text(LL_TASK.format(data=data))
    (tasks / "fam_local_gen.yaml").write_text(GEN_TASK.format(data=data, gen=GEN_TOKENS))
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", device="cpu", batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=["fam_local_ll", "fam_local_gen"],
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      log_samples=True, bootstrap_iters=0, random_seed=0)
    return folder, lm, results, tasks


def _direct_loglikelihood(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(ids).logits.float().log_softmax(-1)[0, len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_max_length_is_not_the_base_position_limit(evaluated):
    folder, lm, _, _ = evaluated
    assert lm.max_length > BASE_POSITIONS, (
        f"lm-eval reads max_length {lm.max_length} from the base config: it would cut contexts from the left")


def test_loglikelihoods_equal_direct_calls(evaluated):
    folder, lm, results, _ = evaluated
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = sorted(results["samples"]["fam_local_ll"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    lengths = [len(tokenizer(d["context"]).input_ids) for d in DOCS]
    assert min(lengths) < BASE_POSITIONS < max(lengths), lengths
    for sample, doc in zip(samples, DOCS):
        got, greedy = sample["resps"][0][0]
        expected, expected_greedy = _direct_loglikelihood(model, tokenizer, doc["context"], doc["continuation"])
        assert abs(float(got) - expected) <= 1e-5, (doc["context"][:20], float(got), expected)
        assert bool(greedy) == expected_greedy


def test_generate_until_equals_greedy_generate(evaluated):
    folder, lm, results, _ = evaluated
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = sorted(results["samples"]["fam_local_gen"], key=lambda s: s["doc_id"])
    for sample, doc in zip(samples, DOCS):
        enc = tokenizer(doc["context"], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        got = sample["resps"][0][0]
        assert got == expected.split("QQQQ")[0], (got, expected)


@pytest.mark.slow
def test_lm_eval_command_line_gives_the_same_numbers(evaluated, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` in a fresh process (it indexes all
    of lm-eval's built-in tasks: about a minute here): the same per-document results as the Python API."""
    folder, _, results, tasks = evaluated
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "fam_local_ll,fam_local_gen",
               "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--output_path",
               str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for task in ("fam_local_ll", "fam_local_gen"):
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        got = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
        expected = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        assert [_strings(s["resps"]) for s in got] == [_strings(s["resps"]) for s in expected], task


def _strings(value):
    """Nested responses with every leaf as a string (the samples file stores them so)."""
    return [_strings(v) for v in value] if isinstance(value, (list, tuple)) else str(value)


def test_a_lora_adapter_through_peft_argument_equals_the_peft_model(evaluated):
    """`HFLM(pretrained=BASE, peft=ADAPTER)` (`--model_args pretrained=...,peft=...`): lm-eval puts the adapter on
    the FAM model with PEFT, and its loglikelihoods are the PeftModel's, past the base's position limit too."""
    from client_helpers import trained_lora

    folder, _, _, tasks = evaluated
    adapter = folder.parent / "fam-lora"
    peft_model = trained_lora(folder, task_type="CAUSAL_LM")
    peft_model.save_pretrained(adapter)
    lm = HFLM(pretrained=str(folder), peft=str(adapter), trust_remote_code=True, dtype="float32", device="cpu",
              batch_size=2)
    assert lm.max_length > BASE_POSITIONS
    results = lm_eval.simple_evaluate(model=lm, tasks=["fam_local_ll"], log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      random_seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = sorted(results["samples"]["fam_local_ll"], key=lambda s: s["doc_id"])
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for sample, doc in zip(samples, DOCS):
        got = float(sample["resps"][0][0][0])
        expected, _ = _direct_loglikelihood(peft_model, tokenizer, doc["context"], doc["continuation"])
        without, _ = _direct_loglikelihood(base, tokenizer, doc["context"], doc["continuation"])
        assert abs(got - expected) <= 1e-5, (doc["context"][:20], got, expected)
        assert abs(got - without) > 1e-3  # the adapter was applied
