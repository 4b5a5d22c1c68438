"""LoRA layer families; each wraps the module it adapts as ``base_layer``."""

from .base import AdapterSpec, LoraLayer, MixedBatch
from .conv import Conv
from .embedding import Embedding
from .linear import FusedLinear, Linear
from .modules_to_save import ModulesToSave
from .quantized import FrozenPackedLinear, Linear4bit
from .quantized8 import Linear8bit

__all__ = [
           "AdapterSpec",
           "Conv",
           "Embedding",
           "FrozenPackedLinear",
           "FusedLinear",
           "Linear",
           "Linear4bit",
           "Linear8bit",
           "LoraLayer",
           "MixedBatch",
           "ModulesToSave",
]
