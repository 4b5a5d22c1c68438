"""lorakit.quant.triton_kernels against the pure-torch reference.

On a CPU the kernels run under TRITON_INTERPRET=1 on small shapes; on a GPU they are compiled and checked on
real shapes too (Llama-3-8B's 4096 x 14336 MLP weight). Dequantization must be bit-identical; the fused GEMV
must match a float64 product of the same dequantized weight to within its output rounding.
"""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernels are defined

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton); the kernels are proven on the GPU run",
                allow_module_level=True)

from lorakit.quant import nf4
from lorakit.quant import triton_kernels as tk

DEVICE = "cuda" if CUDA else "cpu"
CASES = [  # (shape, blocksize, quant_type, double_quant)
    ((33, 70), 64, "nf4", True),  # n not a multiple of the block, odd rows
    ((16, 64), 32, "fp4", False),
    ((5, 7), 64, "nf4", False),  # one partial block, odd n
    ((64, 300), 128, "nf4", True),
    ((40, 600), 64, "fp4", True),  # more than 256 blocks: two nested blocks
]


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def case_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_dequantize_is_bit_identical(case, dtype):
    shape, bs, qt, dq = case
    w = case_weight(shape, 0)
    packed, state = nf4.quantize_4bit(w, bs, qt, dq)
    ref = nf4.dequantize_4bit(packed, state, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element must be written
    tk.dequantize_4bit_triton(packed, state, dtype, out=out)
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [c for c in CASES if c[0][1] % 2 == 0])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_reference(case, dtype, rows):
    shape, bs, qt, dq = case
    w = case_weight(shape, 1)
    packed, state = nf4.quantize_4bit(w, bs, qt, dq)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, shape[1], generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=g).to(dtype).to(DEVICE)
    y = tk.gemv_4bit_triton(x, packed, state, bias)
    w_deq = nf4.dequantize_4bit(packed, state, dtype)  # the weight the reference path multiplies
    exact = x.double() @ w_deq.double().T + bias.double()
    assert y.shape == (rows, shape[0]) and y.dtype == dtype
    # fp32 accumulation in another order, then one rounding to dtype
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    assert torch.all((y.double() - exact).abs() <= ulp * exact.abs() + 1e-5 * exact.abs().max())


def test_gemv_keeps_leading_dims_and_no_bias():
    packed, state = nf4.quantize_4bit(case_weight((24, 1100), 3), 64, "nf4", True)  # K not a multiple of BLOCK_K
    x = torch.randn(2, 1, 1100).to(DEVICE)
    y = tk.gemv_4bit_triton(x, packed, state)
    ref = x.double() @ nf4.dequantize_4bit(packed, state, torch.float32).double().T
    assert y.shape == (2, 1, 24)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="even number"):
        tk.gemv_4bit_triton(torch.randn(1, 7).to(DEVICE), *nf4.quantize_4bit(case_weight((3, 7), 4), 64))


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU (the interpreter is far too slow)")
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_real_shapes_on_gpu(qt):
    w = (torch.randn(4096, 14336, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = nf4.quantize_4bit(w, 64, qt, True)
    ref = nf4.dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(bits(tk.dequantize_4bit_triton(packed, state, torch.bfloat16)), bits(ref))
    x = torch.randn(1, 14336, device="cuda").to(torch.bfloat16)
    y = tk.gemv_4bit_triton(x, packed, state)
    exact = x.double() @ ref.double().T
    assert float((y.double() - exact).norm() / exact.norm()) < 4e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(33, 70), (5, 7), (16, 1030)])  # odd columns; more than one column block
def test_int8_dequantize_is_bit_identical(shape, dtype):
    from lorakit.quant import int8

    codes, scb = int8.quantize_8bit(case_weight(shape, 3))
    ref = int8.dequantize_8bit(codes, scb, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element must be written
    tk.dequantize_8bit_triton(codes, scb, dtype, out=out, block=512)
    assert torch.equal(bits(out), bits(ref))


# -------------------------------------------------- dequantization plus a low-rank addend (QLoRA's merged path)
LOWRANK_CASES = [  # (shape, blocksize, quant_type, double_quant, rank)
    ((33, 128), 64, "nf4", True, 16),  # rows not a multiple of the tile
    ((40, 640), 64, "fp4", True, 16),  # columns not a multiple of the tile
    ((16, 96), 32, "nf4", False, 8),  # rank padded to 16 for the tensor cores
    ((50, 512), 256, "nf4", True, 24),
    ((20, 1024), 512, "nf4", False, 4),
    ((9, 384), 128, "nf4", True, 16),]


def _lowrank_factors(n, k, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(r, k, generator=g) * 0.1).to(dtype).to(DEVICE),
            (torch.randn(n, r, generator=g) * 0.1).to(dtype).to(DEVICE))


def _assert_lowrank_close(out, ref, A, B, scale):
    """One rounding of the same fp32 sum, up to the order in which the tensor cores add the r products: within
    about an ulp of the result plus fp32-class error on the products' magnitude (a cancelling sum of products
    next to a zero code can be tiny, so ulps alone are no measure there); few elements differ at all."""
    magnitude = scale * (B.float().abs() @ A.float().abs())
    err = (out.float() - ref.float()).abs()
    assert bool((err <= ref.float().abs() * 2.0**-7 + magnitude * 2.0**-16).all()), float(err.max())
    assert float((out != ref).float().mean()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LOWRANK_CASES)
def test_dequantize_lowrank_matches_reference(case, dtype):
    shape, bs, qt, dq, r = case
    packed, state = nf4.quantize_4bit(case_weight(shape, 4), bs, qt, dq)
    A, B = _lowrank_factors(*shape, r, dtype, 5)
    out = tk.dequantize_4bit_lowrank_triton(packed, state, A, B, 2.0, dtype)
    ref = nf4.dequantize_4bit_lowrank(packed, state, A, B, 2.0, dtype)
    # one rounding of the same fp32 sum; the rank-r products may be added in another order (tensor cores)
    _assert_lowrank_close(out, ref, A, B, 2.0)
    assert not torch.equal(out, nf4.dequantize_4bit(packed, state, dtype))  # the addend is really there
    fresh = tk.dequantize_4bit_lowrank_triton(packed, state, A, torch.zeros_like(B), 2.0, dtype)
    assert torch.equal(fresh, nf4.dequantize_4bit(packed, state, dtype))  # B == 0: the base (FP4's -0 is +0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(33, 70), (16, 300)])
def test_int8_dequantize_lowrank_matches_reference(shape, dtype):
    from lorakit.quant import int8

    codes, scb = int8.quantize_8bit(case_weight(shape, 6))
    A, B = _lowrank_factors(*shape, 16, dtype, 7)
    out = tk.dequantize_8bit_lowrank_triton(codes, scb, A, B, 0.5, dtype, block_k=128)
    ref = int8.dequantize_8bit_lowrank(codes, scb, A, B, 0.5, dtype)
    _assert_lowrank_close(out, ref, A, B, 0.5)
    fresh = tk.dequantize_8bit_lowrank_triton(codes, scb, A, torch.zeros_like(B), 0.5, dtype)
    assert torch.equal(fresh, int8.dequantize_8bit(codes, scb, dtype))


def test_lowrank_refuses_what_it_cannot_do():
    packed, state = nf4.quantize_4bit(case_weight((16, 70), 8), 64, "nf4", True)  # rows are not whole blocks
    A, B = _lowrank_factors(16, 70, 4, torch.bfloat16, 9)
    assert not tk.lowrank_supported(state, A, B)
    with pytest.raises(ValueError, match="unsupported shapes"):
        tk.dequantize_4bit_lowrank_triton(packed, state, A, B, 1.0, torch.bfloat16)
    packed, state = nf4.quantize_4bit(case_weight((16, 64), 8), 64, "nf4", True)
    A, B = _lowrank_factors(16, 64, 4, torch.float32, 9)
    assert not tk.lowrank_supported(state, A, B)  # fp32 factors would go through tf32: not exact


@pytest.mark.skipif(not CUDA, reason="real shapes on the GPU only")
def test_lowrank_real_shape_on_gpu():
    packed, state = nf4.quantize_4bit(case_weight((4096, 14336), 10), 64, "nf4", True)
    A, B = _lowrank_factors(4096, 14336, 16, torch.bfloat16, 11)
    out = tk.dequantize_4bit_lowrank_triton(packed, state, A, B, 2.0, torch.bfloat16)
    ref = nf4.dequantize_4bit_lowrank(packed, state, A, B, 2.0, torch.bfloat16)
    _assert_lowrank_close(out, ref, A, B, 2.0)
