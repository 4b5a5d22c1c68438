"""Fast paths for LoRA compute. Each has a pure-torch reference it is tested against."""

from .lora_linear import LoraLinearArgs, LoraLinearFunction, lora_linear_fused

__all__ = ["LoraLinearArgs", "LoraLinearFunction", "lora_linear_fused"]
