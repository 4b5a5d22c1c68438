"""Blockwise 4-bit quantization (NF4 and FP4) with double quantization, in plain PyTorch.

This is the reference: it runs on any device, the Triton kernels are tested against it bit for bit, and its
format is the one bitsandbytes writes, so states move between the two libraries unchanged:

* the weight is flattened in row-major order and cut into blocks of ``blocksize`` values (64 by default); the
  last block is padded with zeros, which changes neither its absmax nor the values kept;
* each block stores its absmax (fp32) and one 4-bit code per value: the index of the code-book entry nearest
  to ``value * (1 / absmax)`` (reciprocal, then multiply, as bitsandbytes' CUDA kernel does);
* two codes share a byte, the first value in the high nibble; the packed tensor has shape ``(ceil(n / 2), 1)``;
* double quantization stores the absmax values minus their mean (``offset``) with the signed 8-bit dynamic
  map, in blocks of 256, each with its own fp32 absmax; dequantizing computes ``map[q] * absmax2`` and then
  ``+ offset``, two fp32 roundings;
* a value dequantizes to ``dtype(code[q] * absmax)``, the product rounded once from fp32.

An all-zero block gets code 0 for every value (bitsandbytes' kernel computes 0 * (1/0) = NaN and its decision
tree falls through to 0); it dequantizes to zero either way.

Measured against bitsandbytes 0.50.2 on an H100 (tests/test_quant_nf4.py, bench/qlora.py): NF4 packed codes,
absmax codes, nested absmax and offset are identical, and dequantization is bit-identical both ways. FP4 codes
differ only for values whose ratio to the block absmax lies exactly on a decision boundary (bf16 makes ties
such as 5/24, halfway between 1/6 and 1/4, common: ~1e-4 of values): the CUDA kernel's fast-math reciprocal
rounds 1/absmax differently by an ulp; both codes are then equally near.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import QuantError

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# NormalFloat-4 (QLoRA paper, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 3; 0b001 is the subnormal 0.0625), divided by its max, 12.
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# FP4 encodes sign and magnitude separately. Magnitude codes in increasing value, and the decision boundaries
# between neighbours exactly as bitsandbytes' kernel writes them (0.583333 is not quite 7/12: kept as is).
_FP4_MAGNITUDE_ORDER = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
_FP4_MAGNITUDE_BOUNDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)


def code_book(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for (times the block's absmax)."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return torch.tensor(_FP4_UNSCALED, dtype=torch.float32, device=device) / 12.0


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic code (Dettmers 2015, "8-bit approximations"), 256 sorted fp32 values.

    Exponent e = 0..6 selects a decade 10**(e - 6); within it 2**e fraction values are the midpoints of
    ``linspace(0.1, 1, 2**e + 1)``; each appears with both signs. Add 0 and 1: 2 * 127 + 2 = 256 values.
    The arithmetic mirrors bitsandbytes' (fp32 linspace, midpoints and products) so the map is equal to the
    last bit, which double-quantized states need.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (e - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _bounds(code: torch.Tensor) -> torch.Tensor:
    """Midpoints between neighbouring code values, fp32 sum then halved (as the kernels compute them)."""
    return (code[:-1] + code[1:]) * 0.5


def _nf4_bounds(device) -> torch.Tensor:
    # midpoints in fp64 rounded once: equal to the constants of bitsandbytes' NF4 decision tree
    c = torch.tensor(NF4_CODE, dtype=torch.float64)
    return ((c[:-1] + c[1:]) / 2).to(torch.float32).to(device)


# ---------------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class NestedState:
    """Double quantization of the per-block absmax values: 8-bit codes live in QuantState.absmax."""

    absmax: torch.Tensor  # fp32 (ceil(n_blocks / 256),)
    code: torch.Tensor  # fp32 (256,), the dynamic map
    offset: torch.Tensor  # fp32 scalar: the mean of the absmax values, subtracted before quantizing
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class QuantState:
    """Everything besides the packed codes that dequantization needs.

    Attributes:
        shape: shape of the original tensor.
        dtype: its dtype (what ``dequantize_4bit`` returns by default).
        blocksize: values per absmax block.
        quant_type: "nf4" or "fp4".
        absmax: fp32 (n_blocks,), or uint8 codes of the nested state when double-quantized.
        code: the fp32 (16,) code book.
        nested: the double-quantization state, or None.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: torch.Tensor
    code: torch.Tensor
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.absmax, self.code]
        if self.nested is not None:
            out += [self.nested.absmax, self.nested.code, self.nested.offset]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the state (absmax, code books, offset), not counting the packed codes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested
        if nested is not None:
            nested = NestedState(nested.absmax.to(device), nested.code.to(device), nested.offset.to(device),
                                 nested.blocksize)
        return QuantState(self.shape, self.dtype, self.blocksize, self.quant_type, self.absmax.to(device),
                          self.code.to(device), nested)

    # --------------------------------------------------------------- bitsandbytes serialization
    def as_bnb_dict(self) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes (and transformers) save next to a 4-bit ``weight``, under the same names:
        ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and the JSON-in-uint8
        ``quant_state.bitsandbytes__<type>`` holding the non-tensor fields."""
        out = {"absmax": self.absmax, "quant_map": self.code}
        meta: dict = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                      "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.nested is not None:
            out["nested_absmax"] = self.nested.absmax
            out["nested_quant_map"] = self.nested.code
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested.offset.item()))
        raw = json.dumps(meta).encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(raw), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_dict(cls, tensors: dict[str, torch.Tensor], where: str = "weight") -> QuantState:
        """Read the tensors ``as_bnb_dict`` (or bitsandbytes) wrote; ``where`` names the weight in errors."""
        meta_keys = [k for k in tensors if k.startswith("quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise QuantError(
                f"{where}: expected exactly one 'quant_state.bitsandbytes__nf4|fp4' entry, found {meta_keys}"
            )
        try:
            meta = json.loads(bytes(tensors[meta_keys[0]].to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantError(f"{where}: {meta_keys[0]} is not valid JSON ({exc})") from None
        quant_type = meta.get("quant_type")
        _check_quant_type(quant_type, where)
        blocksize = int(meta.get("blocksize", 0))
        _check_blocksize(blocksize, where)
        dtype = getattr(torch, str(meta.get("dtype")), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise QuantError(f"{where}: quant state dtype {meta.get('dtype')!r} is not a torch float dtype")
        for key in ("absmax", "quant_map"):
            if key not in tensors:
                raise QuantError(f"{where}: the quant state lacks {key!r}; it has {sorted(tensors)}")
        code = tensors["quant_map"].to(torch.float32)
        expected = code_book(quant_type, code.device)
        if code.shape != expected.shape or not torch.equal(code, expected):
            raise QuantError(f"{where}: quant_map is not the standard {quant_type} code book")
        shape = tuple(int(s) for s in meta["shape"])
        nested = None
        if "nested_absmax" in tensors:
            if int(meta.get("nested_blocksize", 0)) != NESTED_BLOCKSIZE:
                raise QuantError(f"{where}: nested_blocksize {meta.get('nested_blocksize')} is not 256")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=code.device)
            nested = NestedState(tensors["nested_absmax"].to(torch.float32),
                                 tensors["nested_quant_map"].to(torch.float32), offset)
        state = cls(shape, dtype, blocksize, quant_type, tensors["absmax"], code, nested)
        _check_state(state, where)
        return state


def _check_state(state: QuantState, where: str) -> None:
    n_blocks = state.n_blocks
    expected_absmax = (torch.uint8 if state.nested is not None else torch.float32, (n_blocks,))
    found = (state.absmax.dtype, tuple(state.absmax.shape))
    if found != expected_absmax:
        raise QuantError(f"{where}: absmax should be {expected_absmax} for shape {state.shape} and blocksize "
                         f"{state.blocksize}, found {found}")
    if state.nested is not None:
        n2 = -(-n_blocks // state.nested.blocksize)
        if tuple(state.nested.absmax.shape) != (n2,) or tuple(state.nested.code.shape) != (256,):
            raise QuantError(f"{where}: nested state should hold {n2} absmax values and a 256-entry map, found "
                             f"{tuple(state.nested.absmax.shape)} and {tuple(state.nested.code.shape)}")


# ---------------------------------------------------------------------------------------------- checks
def _check_quant_type(quant_type, where: str = "quantize") -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantError(f"{where}: unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")


def _check_blocksize(blocksize, where: str = "quantize") -> None:
    if blocksize not in BLOCK_SIZES:
        raise QuantError(f"{where}: blocksize must be one of {BLOCK_SIZES} (bitsandbytes' sizes), got {blocksize!r}")


def check_weight(weight: torch.Tensor, where: str = "weight") -> None:
    """Raise QuantError unless ``weight`` is a non-empty floating tensor of finite values."""
    if not isinstance(weight, torch.Tensor):
        raise QuantError(f"{where}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise QuantError(f"{where}: only floating-point weights can be quantized, found dtype {weight.dtype}")
    if weight.numel() == 0:
        raise QuantError(f"{where}: cannot quantize an empty tensor of shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise QuantError(f"{where}: the tensor is on the meta device (no data to quantize)")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise QuantError(f"{where}: {bad} of {weight.numel()} values are NaN or Inf; refusing to quantize")


# ---------------------------------------------------------------------------------------------- packing
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> bytes, the first of each pair in the high nibble; shape (ceil(n / 2), 1)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 codes, high nibble first, cut to ``n`` values."""
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)
    return codes if n is None else codes[:n]


# ---------------------------------------------------------------------------------------------- blocks
def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = -flat.numel() % blocksize
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def _encode_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code (int32) for values in [-1, 1]; a value on a boundary takes the lower code, as the kernel."""
    if quant_type == "nf4":
        return torch.bucketize(scaled, _nf4_bounds(scaled.device), out_int32=True)
    bounds = torch.tensor(_FP4_MAGNITUDE_BOUNDS, dtype=torch.float32, device=scaled.device)
    order = torch.tensor(_FP4_MAGNITUDE_ORDER, dtype=torch.int32, device=scaled.device)
    magnitude = order[torch.bucketize(scaled.abs(), bounds, out_int32=True).long()]
    return magnitude + (scaled < 0).to(torch.int32) * 8


def quantize_8bit_blockwise(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise signed 8-bit dynamic quantization of a 1-D fp32 tensor -> (uint8 codes, fp32 absmax, map)."""
    code = dynamic_map(values.device)
    blocks = _blocks(values.reshape(-1).to(torch.float32), blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax).unsqueeze(1)
    q = torch.bucketize(scaled, _bounds(code), out_int32=True)
    q[absmax == 0] = 0
    return q.reshape(-1)[: values.numel()].to(torch.uint8), absmax, code


def dequantize_8bit_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 ``code[q] * absmax[block]``."""
    values = code[q.reshape(-1).long()]
    n = values.numel()
    return (_blocks(values, blocksize) * absmax.unsqueeze(1)).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------- 4-bit
def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, where: str = "weight") -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` blockwise to 4 bits; returns (packed uint8 of shape (ceil(n / 2), 1), state).

    Args:
        weight: any floating tensor of finite values, on any device (the result stays there).
        blocksize: values per absmax block, one of 32..4096 (powers of two). Trailing values that do not
            fill a block are padded (the pad is never dequantized).
        quant_type: "nf4" (best for normally distributed weights) or "fp4".
        double_quant: store the absmax values in 8 bits (saves about 0.37 bits per parameter at block 64).
        where: a name for error messages (module path).

    Raises:
        QuantError: unknown quant type or block size, non-floating, empty or non-finite weight.
    """
    _check_quant_type(quant_type, where)
    _check_blocksize(blocksize, where)
    check_weight(weight, where)
    with torch.no_grad():
        blocks = _blocks(weight.detach().reshape(-1).to(torch.float32), blocksize)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks * (1.0 / absmax).unsqueeze(1)
        codes = _encode_4bit(scaled, quant_type)
        codes[absmax == 0] = 0
        del scaled, blocks
        n = weight.numel()
        packed = pack_nibbles(codes.reshape(-1)[: n + n % 2])  # odd n: the last low nibble codes the zero pad
        del codes
        code = code_book(quant_type, weight.device)
        nested = None
        if double_quant:
            offset = absmax.mean()
            q, absmax2, dyn = quantize_8bit_blockwise(absmax - offset)
            nested = NestedState(absmax2, dyn, offset)
            absmax = q
    return packed, QuantState(tuple(weight.shape), weight.dtype, blocksize, quant_type, absmax, code, nested)


def block_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax of every block (decoding the nested state when double-quantized)."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    return dequantize_8bit_blockwise(state.absmax, nested.absmax, nested.code, nested.blocksize) + nested.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dtype(code[q] * absmax)`` for every value, in the original shape; dtype defaults to the original."""
    dtype = state.dtype if dtype is None else dtype
    n = state.numel
    if packed.numel() * 2 < n or packed.numel() * 2 > n + 1:
        raise QuantError(f"packed codes hold {packed.numel() * 2} values but the state's shape {state.shape} "
                         f"has {n}")
    with torch.no_grad():
        # one lookup per byte in a 256 x 2 table of (high, low) code values: half the index work of unpacking
        # the nibbles first, and the same fp32 products as code[q] * absmax (bit for bit)
        code = state.code.to(torch.float32)
        table = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)
        values = torch.index_select(table, 0, packed.reshape(-1).to(torch.int32)).reshape(-1)
        out = _blocks(values, state.blocksize).mul_(block_absmax(state).unsqueeze(1))
        return out.reshape(-1)[:n].to(dtype).reshape(state.shape)


def dequantize_4bit_lowrank(packed: torch.Tensor, state: QuantState, A: torch.Tensor, B: torch.Tensor,
                            scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dtype(D(W) + scale * B @ A)`` with D(W) the fp32 products ``code[q] * absmax`` and one rounding at the
    end: a frozen 4-bit weight plus a low-rank addend (N, r) @ (r, K), materialized in one step. The reference
    of ``triton_kernels.dequantize_4bit_lowrank_triton``; with B == 0 it equals ``dequantize_4bit``."""
    dtype = state.dtype if dtype is None else dtype
    return add_lowrank(dequantize_4bit(packed, state, torch.float32), A, B, scale, dtype)


def add_lowrank(exact: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """``dtype(exact + scale * B @ A)``, summed in fp32 (fp64 for fp64 output) and rounded once: the shared
    step of the low-rank dequantization references (4-bit here, int8 in int8.py)."""
    with torch.no_grad():
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return exact.to(wide).addmm_(B.to(wide), A.to(wide), alpha=scale).to(dtype)


def error_stats(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Mean and max absolute error and relative Frobenius error of ``approx`` against ``exact`` (fp32)."""
    diff = approx - exact
    norm = float(torch.linalg.vector_norm(exact))
    return {
        "mean_abs": float(diff.abs().mean()),
        "max_abs": float(diff.abs().max()),
        "rel_fro": float(torch.linalg.vector_norm(diff)) / norm if norm else 0.0,
    }


def quantization_error(weight: torch.Tensor, packed: torch.Tensor, state: QuantState) -> dict[str, float]:
    """Mean and max absolute error and relative Frobenius error of the 4-bit copy (computed in fp32)."""
    return error_stats(dequantize_4bit(packed, state, torch.float32), weight.detach().to(torch.float32))
