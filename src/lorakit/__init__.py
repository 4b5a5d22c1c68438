"""lorakit: Low-Rank Adaptation (LoRA) for any PyTorch model.

The public API in one import: ``inject`` adapters into a model, switch/merge/unload them, and save or load
them as PEFT-compatible safetensors files.
"""

from .config import FusedSpec, LoraConfig
from .errors import (
    AdapterError,
    AdapterLoadError,
    ConfigError,
    LoraError,
    MergeError,
    QuantError,
    TargetError,
)
from .functional import lora_delta
from .graphs import eager_calls, graph_layers, graphed_replays, ungraph_layers
from .io import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .kernels.lora_linear import checkpoint_kwargs
from .layers import Linear4bit, Linear8bit, LoraLayer
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
from .optim import loraplus_optimizer, loraplus_param_groups
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
from .pissa import pissa_to_lora_state, save_pissa_as_lora
from .prefix import PrefixConfig, add_prefix, delete_prefix, disable_prefix, fold_prefix, set_active_prefix
from .qlora import memory_report, merge_requantized, merge_to_dense, prepare_for_kbit_training, quantize_model
from .quant_loading import load_quantized

__version__ = "0.1.0"

__all__ = [
    "eager_calls",
    "graph_layers",
    "graphed_replays",
    "ungraph_layers",
    "AdapterError",
    "AdapterLoadError",
    "ConfigError",
    "FusedSpec",
    "Linear4bit",
    "Linear8bit",
    "LoraConfig",
    "LoraError",
    "LoraLayer",
    "MergeError",
    "PrefixConfig",
    "QuantError",
    "Summary",
    "TargetError",
    "active_adapters",
    "adapter_per_sample",
    "adapter_state_dict",
    "add_adapter",
    "add_prefix",
    "checkpoint_kwargs",
    "combine_adapters",
    "delete_adapter",
    "delete_parametrized_adapter",
    "delete_prefix",
    "disable_adapters",
    "disable_parametrized",
    "disable_prefix",
    "find_targets",
    "fold_prefix",
    "forward_mixed",
    "inject",
    "list_adapters",
    "load_adapter",
    "load_parametrized_state",
    "load_quantized",
    "lora_delta",
    "lora_layers",
    "loraplus_optimizer",
    "loraplus_param_groups",
    "mark_trainable",
    "memory_report",
    "merge",
    "merge_requantized",
    "merge_to_dense",
    "parametrize",
    "parametrized_active",
    "parametrized_state_dict",
    "pissa_to_lora_state",
    "prepare_for_kbit_training",
    "quantize_model",
    "read_adapter",
    "remove_parametrizations",
    "save_adapter",
    "save_pissa_as_lora",
    "set_active_adapters",
    "set_active_prefix",
    "set_parametrized_active",
    "set_parametrized_enabled",
    "summary",
    "unload",
    "unmerge",
]
