"""Load a FAM model for the command line and the notebooks: a FAM checkpoint as it is, or a base checkpoint
(Llama, Mistral, Gemma, ...) wrapped into FAM mode on the fly."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class FAMOverrides:
    """FAM settings for a base checkpoint (C, M, F, fam_layers); None keeps the checkpoint's (or the paper's)
    value."""

    block_size: int | None = None
    memory_segments: int | None = None
    fam_length: int | None = None
    fam_layers: str | None = None

    @classmethod
    def from_args(cls, args) -> FAMOverrides:
        """The settings given on a command line (see hf_fam/cli/fam_args.py); None where not given."""
        return cls(*(getattr(args, f, None) for f in ("block_size", "memory_segments", "fam_length", "fam_layers")))

    def settings(self):
        """A FAMSettings: the values given here, the paper's defaults for the rest."""
        from ..modeling.fam_settings import FAMSettings

        return FAMSettings(**{k: v for k, v in vars(self).items() if v is not None})


def resolve_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(table)}")
    return table[name]


def hub_access(source: str, revision: str | None = None, probe_timeout: float = 3.0) -> dict:
    """For `source`, a name that is not a local folder: fail fast when the Hub cannot answer.

    huggingface_hub retries a request it could not send for about half a minute before transformers gives up.
    When HF_HUB_OFFLINE is set, or a connection to the Hub endpoint fails within `probe_timeout` seconds (no
    proxy configured), `source` must be in the local Hub cache: then the extra `from_pretrained` arguments
    returned ({"local_files_only": True}) keep transformers from trying the network; otherwise one line says
    why. With the Hub reachable, returns {} and the Hub answers as usual.

    Raises:
        FileNotFoundError: not in the cache while offline or unreachable, or not a valid Hub id.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = any(isinstance(try_to_load_from_cache(source, name, revision=revision), str)
                     for name in ("config.json", "adapter_config.json"))  # a checkpoint, or an adapter of one
    except HFValidationError:
        raise FileNotFoundError(f"no checkpoint at {source}: no such folder, and not a valid Hub id") from None
    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    elif any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return {}  # the proxy decides; a direct connection says nothing
    else:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=probe_timeout).close()
            return {}
        except OSError as err:
            why = f"the Hub ({url.hostname}) is unreachable ({err.strerror or err})"
    if cached:
        return {"local_files_only": True}
    raise FileNotFoundError(f"no checkpoint at {source}: no such folder, {why}, and the Hub cache does not hold it; "
                            "check the name (a local folder: its path, e.g. ./NAME)")


def load_fam_model(source: str, *, overrides: FAMOverrides | None = None, dtype: str | None = "auto",
                   device: str = "cpu", revision: str | None = None, token: str | None = None,
                   attn_implementation: str | None = None, adapters: bool = False, quantize: str | None = None):
    """Load `source` (a local folder or a Hub id) as a FAM model, in eval mode.

    `quantize` ("4bit" or "8bit", `hf_fam.runtime.quantize`) loads the weights quantized by bitsandbytes, placed
    on `device` as they load; an adapter then stays unmerged on its quantized base (merging into quantized
    weights would round it).

    With `adapters`, `source` may also be a LoRA adapter of a FAM checkpoint (a folder or Hub repo holding
    adapter_config.json, as `hf-fam finetune` writes and `hf-fam push` shares): its base is loaded as above (a Hub
    base at the `revision` the adapter's config pins, as `AutoPeftModelForCausalLM` loads it) and
    the adapter merged into it (merged and unmerged logits agree, tested); the tokenizer is the adapter's when it
    carries one, else the base's. The base must be a FAM checkpoint: an adapter trained on a model put in FAM
    mode on the fly would need the settings it was trained with, which an adapter does not record.

    A FAM checkpoint (model_type "fam") loads with its own settings, which `overrides` may not change.
    A base checkpoint is loaded and wrapped with `FAMForCausalLM.from_base_model`; settings not given in
    `overrides` take the paper's defaults (`FAMSettings()`: C=1024, M=3, F=64, all layers), and the memory
    takes the zero-shot start that `hf-fam convert` and `hf_fam.patch` give it (docs/zero_shot.md): the BOS
    embedding in every slot, `fam_update="sink"` (so the same command gives the same output every time).

    Returns:
        (model, tokenizer or None); `model.config.model_type != "fam"` never happens: a base checkpoint comes
        back wrapped (check the source's config to know whether it was converted).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import FAMForCausalLM

    overrides = overrides or FAMOverrides()
    source = str(source)
    local = os.path.exists(os.path.expanduser(source))
    if source.startswith(("/", "./", "../", "~")) and not local:
        raise FileNotFoundError(f"no checkpoint at {source}: no such folder")
    hub = dict(revision=revision, token=token)
    if not local:
        hub.update(hub_access(source, revision))  # offline or unreachable: fail now, not after ~30 s of retries
    adapter_config = _adapter_config(source, local, hub)
    if adapter_config is not None:
        if not adapters:
            raise ValueError(f"{source} is a LoRA adapter, not a checkpoint; pass the checkpoint it applies to "
                             f"({adapter_config.get('base_model_name_or_path')}), or its merged model")
        return _load_adapter(source, adapter_config, overrides=overrides, dtype=dtype, device=device, hub=hub,
                             attn_implementation=attn_implementation, quantize=quantize)
    if local and not os.path.isfile(os.path.join(os.path.expanduser(source), "config.json")):
        raise FileNotFoundError(f"no checkpoint at {source} (config.json missing); pass a checkpoint folder.")
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except (OSError, ValueError) as err:  # no such Hub repository, no Hub reachable, or a bad id
        raise FileNotFoundError(
            f"no checkpoint at {source}: not a local folder, and the Hub says: {str(err).splitlines()[0]}"
        ) from None
    kwargs = dict(dtype=resolve_dtype(dtype), **hub)
    if hub.get("local_files_only"):  # transformers does not pass it on to its look-up of a PEFT adapter
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from .quantize import loading_kwargs

    kwargs.update(loading_kwargs(quantize, kwargs["dtype"], config, device))
    if config.model_type == "fam":
        for name, value in vars(overrides).items():
            if value is not None and value != getattr(config, name):
                raise ValueError(
                    f"{source} is a FAM checkpoint with {name} {getattr(config, name)}; --{name.replace('_', '-')} "
                    f"{value} only applies to base checkpoints (drop it, or convert the base model again)."
                )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    else:
        from ..modeling.fam_adapters import get_adapter

        get_adapter(config.model_type)  # unsupported family: one error naming the supported ones
        from ..checkpoint_io.fam_init import bos_fam_init
        from ..modeling.fam_settings import ZERO_SHOT_FAM_UPDATE

        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        settings = overrides.settings()
        model = FAMForCausalLM.from_base_model(
            base, **{**settings.as_kwargs(), "fam_update": ZERO_SHOT_FAM_UPDATE},
            fam_init=bos_fam_init(base, settings.fam_length) if settings.fam_length else None,
        )
    (model if quantize else model.to(device)).eval()
    tokenizer = None
    folder = os.path.expanduser(source)
    if not local or any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        except (OSError, ValueError):
            tokenizer = None  # a checkpoint without a tokenizer
    return model, tokenizer


def _adapter_config(source: str, local: bool, hub: dict) -> dict | None:
    """`source`'s adapter_config.json when it is a PEFT adapter (adapter_config.json and no config.json), else None."""
    import json

    if local:
        folder = os.path.expanduser(source)
        path = os.path.join(folder, "adapter_config.json")
        if os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(path):
            return None
    else:
        from transformers.utils import cached_file

        lookup = dict(hub, _raise_exceptions_for_missing_entries=False,
                      _raise_exceptions_for_connection_errors=False)
        try:
            if cached_file(source, "config.json", **lookup) is not None:
                return None
            path = cached_file(source, "adapter_config.json", **lookup)
        except (OSError, ValueError):
            return None  # the checkpoint's own loading says what is wrong
        if path is None:
            return None
    with open(path) as f:
        return json.load(f)


def find_adapter(source: str, *, revision: str | None = None, token: str | None = None) -> dict | None:
    """`source`'s adapter_config.json when it is a PEFT adapter (a folder or Hub repo with adapter_config.json and
    no config.json), else None (a checkpoint, or nothing: loading it says what is wrong)."""
    source = str(source)
    local = os.path.exists(os.path.expanduser(source))
    hub = dict(revision=revision, token=token)
    if not local:
        hub.update(hub_access(source, revision))
    return _adapter_config(source, local, hub)


def adapter_base(source: str, adapter_config: dict, token: str | None = None) -> tuple[str, str | None, object]:
    """The FAM checkpoint the LoRA adapter at `source` applies to: (its path or Hub id, the commit `hf-fam push`
    pinned or None, its config). Raises a one-line ValueError for another kind of adapter or a base that is not
    a FAM checkpoint."""
    from transformers import AutoConfig

    base = adapter_config.get("base_model_name_or_path")
    if adapter_config.get("peft_type") != "LORA" or not base:
        raise ValueError(f"{source} holds a {adapter_config.get('peft_type')} adapter naming base {base!r}; hf_fam "
                         "loads LoRA adapters of a FAM checkpoint")
    local_base = os.path.exists(os.path.expanduser(base))
    moved = os.path.join(source, os.path.basename(base.rstrip("/")))
    if not local_base and os.path.isabs(os.path.expanduser(base)) and os.path.isdir(moved):
        # a run folder moved or copied elsewhere: its adapter still names the base where it was made
        # (OUT/fam_base, an absolute path), which travelled inside it
        base, local_base = moved, True
    revision = None if local_base else adapter_config.get("revision")  # the base's commit `hf-fam push` pinned
    base_hub = {} if local_base else hub_access(base, revision)
    config = AutoConfig.from_pretrained(base, token=token, revision=revision, **base_hub)
    if config.model_type != "fam":
        raise ValueError(f"the base of the adapter {source}, {base}, is not a FAM checkpoint: an adapter is loaded "
                         "on the FAM checkpoint it was trained on (hf-fam finetune saves it as OUT/fam_base)")
    return base, revision, config


def _load_adapter(source: str, adapter_config: dict, *, overrides, dtype, device, hub: dict, attn_implementation,
                  quantize: str | None = None):
    """The adapter at `source` merged into its FAM base (see `load_fam_model`); on a quantized base, unmerged."""
    base, revision, _ = adapter_base(source, adapter_config, token=hub.get("token"))
    from peft import PeftModel

    model, tokenizer = load_fam_model(base, overrides=overrides, dtype=dtype, device=device, token=hub.get("token"),
                                      revision=revision, attn_implementation=attn_implementation, quantize=quantize)
    peft_hub = {k: v for k, v in hub.items() if v is not None}
    model = PeftModel.from_pretrained(model, source, **peft_hub)
    model = (model if quantize else model.merge_and_unload()).eval()
    return model, adapter_tokenizer(source, tokenizer, hub)


def adapter_tokenizer(source: str, base_tokenizer, hub: dict | None = None):
    """The tokenizer an adapter folder or repo carries, else its base's (`base_tokenizer`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **(hub or {}))
    except (OSError, ValueError, TypeError):
        return base_tokenizer  # no tokenizer with the adapter
