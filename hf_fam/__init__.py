"""hf_fam: TransformerFAM (Feedback Attention Memory) for Hugging Face Transformers.

`import hf_fam` registers `FAMConfig` (model_type "fam") with AutoConfig, `FAMModel` (the backbone) with
AutoModel and `FAMForCausalLM` with AutoModelForCausalLM.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling.configuration_fam import FAMConfig
from .modeling.fam_adapters import supported_model_types
from .modeling.fam_cache import FAMCache
from .modeling.fam_settings import FAMSettings
from .modeling.modeling_fam import FAMForCausalLM, FAMModel
from .patching import patch, unpatch

__version__ = "0.1.0"

AutoConfig.register("fam", FAMConfig, exist_ok=True)
AutoModel.register(FAMConfig, FAMModel, exist_ok=True)
AutoModelForCausalLM.register(FAMConfig, FAMForCausalLM, exist_ok=True)

__all__ = ["FAMCache", "FAMConfig", "FAMForCausalLM", "FAMModel", "FAMSettings", "patch", "supported_model_types", "unpatch", "__version__"]
