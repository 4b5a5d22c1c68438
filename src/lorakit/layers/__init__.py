"""LoRA layer families; each wraps the module it adapts as ``base_layer``."""

from .base import AdapterSpec, LoraLayer, MixedBatch
from .conv import Conv
from .embedding import Embedding
from .linear import FusedLinear, Linear
from .modules_to_save import ModulesToSave
from .quantized import Linear4bit

__all__ = ["AdapterSpec", "Conv", "Embedding", "FusedLinear", "Linear", "Linear4bit", "LoraLayer", "MixedBatch",
           "ModulesToSave"]
