"""sentence-transformers on a FAM checkpoint: `SentenceTransformer(DIR, trust_remote_code=True)` loads the FAM
backbone (`AutoModel` -> FAMModel) and pools its hidden states, so a text longer than the window is embedded with
the memory, never by a plain decoder: the embeddings are the backbone's at the pooled token, a padded batch's are each
text's alone (1e-5), the checkpoint's own code gives the same where hf_fam is not installed, and training reaches
`fam_init`."""

from __future__ import annotations

import pytest
import torch
from client_helpers import base_folder, fam_checkpoint
from conftest import assert_close
from convert_helpers import run_without_hf_fam
from transformers import AutoModel

st = pytest.importorskip("sentence_transformers")

TEXTS = ["a short one", "feedback attention memory reads long input block by block " * 4, "three words here"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("st") / "fam")


def _model(path):
    return st.SentenceTransformer(str(path), trust_remote_code=True, device="cpu",
                                  model_kwargs={"dtype": torch.float32})


def _pooled_by_hand(model, backbone, text):
    """The backbone's last hidden state at the pooled token of `text` tokenized as sentence-transformers does."""
    features = model[0].preprocess([text])
    with torch.no_grad():
        hidden = backbone(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    return hidden.last_hidden_state[0, -1]


def test_embeddings_are_the_fam_backbones_and_a_padded_batch_is_each_text_alone(folder):
    model = _model(folder)
    assert type(model[0].auto_model).__name__ == "FAMModel"
    assert model[1].get_config_dict()["pooling_mode"] == "lasttoken"  # a decoder's default pooling
    batched = model.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    backbone = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    plain = AutoModel.from_pretrained(base_folder(folder), dtype=torch.float32).eval()
    for i, text in enumerate(TEXTS):
        alone = model.encode([text], convert_to_tensor=True)[0]
        assert_close(batched[i], alone, msg=f"text {i}: padded batch vs alone")
        assert_close(alone, _pooled_by_hand(model, backbone, text), msg=f"text {i}: the FAM backbone")
    long_text = TEXTS[1]
    assert model[0].preprocess([long_text])["input_ids"].shape[1] > 3 * backbone.config.attention_window
    # the memory is in it: the plain decoder (full attention) embeds the long text otherwise
    assert (_pooled_by_hand(model, plain, long_text) - batched[1]).abs().max() > 1e-3


def test_the_checkpoints_own_code_embeds_the_same_where_hf_fam_is_not_installed(folder, tmp_path):
    expected = _model(folder).encode(TEXTS, convert_to_tensor=True)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
        import torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(folder)!r}, trust_remote_code=True, device="cpu",
                                    model_kwargs={{"dtype": torch.float32}})
        assert type(model[0].auto_model).__module__.startswith("transformers_modules"), type(model[0].auto_model)
        got = model.encode({TEXTS!r}, convert_to_tensor=True)
        print("diff", (got - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
    """
    result = run_without_hf_fam(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("diff")[1].split()[0]) <= 1e-5, result.stdout


def test_training_an_embedding_model_reaches_fam_init(folder):
    model = _model(folder)
    model.train()
    features = model.preprocess(TEXTS[:2])
    embeddings = model(features)["sentence_embedding"]
    torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0).backward()
    (name, param), = [(n, p) for n, p in model.named_parameters() if n.endswith("fam.fam_init")]
    assert param.grad is not None and param.grad.abs().sum() > 0, name
