"""lorakit: Low-Rank Adaptation (LoRA) for any PyTorch model.

The public API in one import: ``inject`` adapters into a model, switch/merge/unload them, and save or load
them as PEFT-compatible safetensors files.
"""

from .config import FusedSpec, LoraConfig
from .errors import AdapterError, AdapterLoadError, ConfigError, LoraError, MergeError, TargetError
from .functional import lora_delta
from .io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .layers import LoraLayer
from .merge import combine_adapters, merge, unload, unmerge
from .model import (
    Summary,
    active_adapters,
    adapter_per_sample,
    add_adapter,
    delete_adapter,
    disable_adapters,
    find_targets,
    forward_mixed,
    inject,
    list_adapters,
    lora_layers,
    mark_trainable,
    set_active_adapters,
    summary,
)
from .parametrize import (
    delete_parametrized_adapter,
    disable_parametrized,
    load_parametrized_state,
    parametrize,
    parametrized_active,
    parametrized_state_dict,
    remove_parametrizations,
    set_parametrized_active,
    set_parametrized_enabled,
)

from .errors import QuantError
from .layers import Linear4bit
from .qlora import memory_report, merge_requantized, merge_to_dense, prepare_for_kbit_training, quantize_model
from .quant_loading import load_quantized

from .optim import loraplus_optimizer, loraplus_param_groups
from .pissa import pissa_to_lora_state, save_pissa_as_lora
from .prefix import PrefixConfig, add_prefix, delete_prefix, disable_prefix, fold_prefix, set_active_prefix

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "AdapterLoadError", "ConfigError", "FusedSpec", "LoraConfig", "LoraError", "LoraLayer",
    "MergeError", "Summary", "TargetError", "active_adapters", "adapter_per_sample", "add_adapter",
    "combine_adapters", "delete_adapter", "disable_adapters", "find_targets", "forward_mixed", "inject",
    "list_adapters", "lora_delta", "lora_layers", "mark_trainable", "merge", "set_active_adapters", "summary",
    "unload", "unmerge",
    "delete_parametrized_adapter", "disable_parametrized", "load_parametrized_state", "parametrize",
    "parametrized_active", "parametrized_state_dict", "remove_parametrizations", "set_parametrized_active",
    "set_parametrized_enabled", "adapter_state_dict", "load_adapter", "read_adapter", "save_adapter",
    "Linear4bit", "QuantError", "load_quantized", "memory_report", "merge_requantized", "merge_to_dense",
    "prepare_for_kbit_training", "quantize_model",
    "loraplus_optimizer", "loraplus_param_groups", "pissa_to_lora_state", "save_pissa_as_lora", "PrefixConfig",
    "add_prefix", "delete_prefix", "disable_prefix", "fold_prefix", "set_active_prefix",
]
