"""A tiny GGUF file written with the `gguf` package's writer, for the conversion tests.

The model is a random tiny Llama (hf_fam.tiny's settings), its tensors stored as float32 under llama.cpp's
names, with llama.cpp's permutation of the q/k rows (transformers undoes it when it reads the file), and a
byte-level BPE tokenizer of 256 byte tokens, two merges and three special tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py), inverse of transformers' reverse_permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed: int = 0, vocab_size: int = 261):
    from hf_fam.tiny import tiny_model

    return tiny_model("llama", seed, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=258, eos_token_id=258).eval()


def write_tiny_gguf(path: Path, *, architecture: str = "llama", seed: int = 0, name: str = "tiny-llama"):
    """Write the tiny Llama as a GGUF file at `path`; returns the model (the reference for the weights)."""
    import gguf

    model = tiny_llama(seed)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_license("apache-2.0")
    writer.add_languages(["en"])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = _bytes_to_unicode() + ["Ġt", "he"] + SPECIAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for key, array in sd.items():
        if key in names:
            target = names[key]
        else:
            _, _, i, *rest = key.split(".")
            module = ".".join(rest[:-1])
            target = f"blk.{i}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                array = _permute(array, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _permute(array, cfg.num_key_value_heads)
        writer.add_tensor(target, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
