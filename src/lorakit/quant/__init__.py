"""4-bit blockwise quantization (NF4 / FP4, double quantization) in the bitsandbytes format.

``nf4`` is the pure-PyTorch reference (any device); ``triton_kernels`` holds the GPU fast paths, bit-identical
to it; ``dequantize`` picks the fast path when it can. This package knows nothing of LoRA.
"""

from .dispatch import dequantize, gemv_4bit, triton_available
from .nf4 import (
    BLOCK_SIZES,
    NF4_CODE,
    QUANT_TYPES,
    NestedState,
    QuantState,
    block_absmax,
    check_weight,
    code_book,
    dequantize_4bit,
    dynamic_map,
    pack_nibbles,
    quantization_error,
    quantize_4bit,
    unpack_nibbles,
)

__all__ = [
    "BLOCK_SIZES", "NF4_CODE", "QUANT_TYPES", "NestedState", "QuantState", "block_absmax", "check_weight",
    "code_book", "dequantize", "dequantize_4bit", "dynamic_map", "gemv_4bit", "pack_nibbles",
    "quantization_error", "quantize_4bit", "triton_available", "unpack_nibbles",
]
