"""FAMConfig: a base decoder's config, nested, plus the three FAM settings.

Ships with every converted checkpoint (imports only transformers and its siblings).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# first: refuses a transformers release outside the supported range with one line, before anything else runs
from .fam_compat import check_transformers_version  # noqa: F401  # isort: skip
from .fam_adapters import get_adapter
from .fam_settings import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_FAM_LAYERS,
    DEFAULT_FAM_LENGTH,
    DEFAULT_FAM_UPDATE,
    DEFAULT_MEMORY_SEGMENTS,
    FAMSettings,
    validate_fam_settings,
    validate_fam_update,
)

# What a FAM model reports as its maximum input length. Its positions are frame positions inside the
# attention window (docs/design.md §1), never absolute, so no input length reaches the base model's limit;
# clients that truncate to `max_position_embeddings` (lm-evaluation-harness, generate) must not.
UNBOUNDED_LENGTH = 2**62

# Each task head FAM serves, by the transformers Auto class that loads it -> its FAM class (in modeling_fam), what
# messages and cards call it, and PEFT's task type for its adapters (the class PEFT reloads them with, and the head
# layer it trains and saves with them)
HEADS = {
    "AutoModelForCausalLM": ("FAMForCausalLM", "causal LM", "CAUSAL_LM"),
    "AutoModelForSequenceClassification": ("FAMForSequenceClassification", "sequence classifier", "SEQ_CLS"),
    "AutoModelForTokenClassification": ("FAMForTokenClassification", "token classifier", "TOKEN_CLS"),
}

# The classes a converted checkpoint's config.json maps for `trust_remote_code=True`
AUTO_MAP = {
    "AutoConfig": "configuration_fam.FAMConfig",
    "AutoModel": "modeling_fam.FAMModel",
    **{auto_class: f"modeling_fam.{fam_class}" for auto_class, (fam_class, _, _) in HEADS.items()},
}

# The FAM class of each task head (a checkpoint's `architectures`) -> the Auto class of its base model
HEAD_AUTO_CLASSES = {fam_class: auto_class for auto_class, (fam_class, _, _) in HEADS.items()}

# A sequence classifier's labels: read from this config (the top level), where transformers and its clients
# (pipelines, the loss) read and write them; taken from the base config when a loaded base model is wrapped
LABEL_FIELDS = ("id2label", "label2id", "problem_type")

# Token ids the base model's own code reads from its config (`get_text_config()`: the sequence classifier's
# padding): set on this config, they are set there too
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# the per-module implementations transformers chooses at load time ("sdpa", "grouped_mm", ...), set on sub-configs
IMPLEMENTATIONS = ("attn", "experts")


class FAMConfig(PretrainedConfig):
    r"""Configuration of a TransformerFAM model (Hwang et al., arXiv 2404.09173).

    Args:
        base_config (`PretrainedConfig` or `dict`):
            The config of the decoder FAM runs inside (a Llama, Mistral, Gemma, ... config). A dict needs
            its `model_type`.
        block_size (`int`, defaults to 1024):
            C, tokens per block. Attention runs block by block; the FAM is updated after every block.
        memory_segments (`int`, defaults to 3):
            M, previous blocks each block attends to (0 = none).
        fam_length (`int`, defaults to 64):
            F, FAM tokens per layer (0 = block sliding window attention, no memory).
        fam_layers (`str`, defaults to `"all"`):
            Which layers carry FAM. `"all"`: every layer; layers the checkpoint runs with a sliding window
            (Gemma 2/3 local layers, Qwen 2 / Mistral windows) use the FAM block window instead. `"global"`:
            only the checkpoint's full-attention layers carry FAM; its sliding-window layers run block
            sliding window attention (same C and M, no FAM).
        fam_update (`str`, defaults to `"paper"`):
            How the memory evolves. `"paper"`: updated by the layer after every block (the paper's Algorithm
            2). `"sink"`: the zero-shot start `hf-fam convert` writes: the memory keeps its initial value and
            block tokens read its first slot only, as an attention sink, until fine-tuning sets `"paper"`.

    Any attribute not found here is read from `base_config` (e.g. `config.vocab_size`).

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from hf_fam import FAMConfig
    >>> config = FAMConfig(base_config=LlamaConfig(num_hidden_layers=2), block_size=256, fam_length=16)
    >>> config.block_size, config.num_hidden_layers
    (256, 2)
    ```
    """

    model_type = "fam"
    sub_configs = {"base_config": AutoConfig}
    # releases before the dataclass configs build `cls()` to diff against unless told it needs arguments
    has_no_defaults_at_init = True

    def __init__(
        self,
        base_config: PretrainedConfig | dict | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        memory_segments: int = DEFAULT_MEMORY_SEGMENTS,
        fam_length: int = DEFAULT_FAM_LENGTH,
        fam_layers: str = DEFAULT_FAM_LAYERS,
        fam_update: str = DEFAULT_FAM_UPDATE,
        **kwargs,
    ):
        if base_config is None:
            raise ValueError("FAMConfig needs base_config: the config of the model FAM runs inside.")
        if isinstance(base_config, dict):
            base_config = dict(base_config)
            model_type = base_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("FAMConfig: base_config given as a dict needs its 'model_type'.")
            base_config = AutoConfig.for_model(model_type, **base_config)
        if not isinstance(base_config, PretrainedConfig):
            raise ValueError(f"FAMConfig: base_config must be a config or a dict, got {type(base_config).__name__}")
        get_adapter(base_config.model_type)  # unknown family -> ValueError listing the supported ones
        validate_fam_settings(block_size, memory_segments, fam_length, fam_layers)
        self.base_config = base_config
        self.block_size = block_size
        self.memory_segments = memory_segments
        self.fam_length = fam_length
        self.fam_layers = fam_layers
        validate_fam_update(fam_update)
        self.fam_update = fam_update
        # generation / embedding settings live on the base config; mirror the ones transformers reads
        # at the top level before any attribute lookup could reach the base config
        for name in ("tie_word_embeddings", *TOKEN_ID_FIELDS):
            if name not in kwargs and hasattr(base_config, name):
                kwargs[name] = getattr(base_config, name)
        if "id2label" not in kwargs and "num_labels" not in kwargs:  # a wrapped classifier keeps its labels
            kwargs.update({name: getattr(base_config, name, None) for name in LABEL_FIELDS if name not in kwargs})
        base_impls = {kind: getattr(base_config, f"_{kind}_implementation_internal", None) for kind in IMPLEMENTATIONS}
        super().__init__(**kwargs)
        for kind, impl in base_impls.items():
            if impl is not None and kwargs.get(f"{kind}_implementation") is None:
                # PretrainedConfig.__init__ resets the implementations of sub-configs; keep the base model's
                setattr(base_config, f"_{kind}_implementation", impl)
        # from here on, attributes missing here are read from the base config (not during __init__:
        # transformers probes attributes with hasattr there and would copy the base's to the top level)
        self.__dict__["_fam_delegate"] = True

    def __getattr__(self, name: str):
        # only called when normal lookup fails: fall back to the base model's config
        if name.startswith("_") or name == "base_config" or not self.__dict__.get("_fam_delegate"):
            raise AttributeError(name)
        return getattr(self.__dict__["base_config"], name)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in TOKEN_ID_FIELDS and self.__dict__.get("_fam_delegate"):
            setattr(self.__dict__["base_config"], name, value)

    def __delattr__(self, name: str):
        # what __getattr__ reads from the base config is deleted there: transformers' `dequantize` deletes
        # `config.quantization_config`, which a FAM model wrapping a quantized base reads from its base's config
        delegated = self.__dict__.get("_fam_delegate") and not name.startswith("_") and name not in self.__dict__
        if delegated and hasattr(self.__dict__["base_config"], name):
            delattr(self.__dict__["base_config"], name)
        else:
            super().__delattr__(name)

    def get_text_config(self, decoder=None, encoder=None):
        return self.base_config

    @property
    def fam_settings(self) -> FAMSettings:
        """C, M, F and fam_layers as one FAMSettings value."""
        return FAMSettings.of(self)

    @property
    def attention_window(self) -> int:
        """Tokens a block token attends to directly: C·(M+1)."""
        return self.fam_settings.attention_window

    @property
    def max_position_embeddings(self) -> int:
        """Unbounded (`UNBOUNDED_LENGTH`): FAM runs at frame positions, however long the input. The base
        model's own limit stays in `base_config.max_position_embeddings`."""
        return UNBOUNDED_LENGTH

    def to_dict(self):
        out = super().to_dict()
        out.pop("_fam_delegate", None)
        out["base_config"] = self.base_config.to_dict()
        return out
