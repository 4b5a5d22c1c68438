"""The fused 4-bit GEMV (triton_kernels.gemv_4bit_triton) against dequantize-then-matmul, over its code paths.

On a CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py): small shapes that hit partial tiles,
K not a multiple of the block or of the tile (per-group absmax with small groups), several rows of x (FMA and
tensor-core paths), split-K, strided rows, bias or none, NF4/FP4, double quantization or not, block 64/128.
Tolerance: the kernel rounds every weight to x's dtype exactly as the reference does and sums in fp32 in
another order, then rounds once: |y - exact| <= ulp(dtype) * |exact| + 1e-5 * max|exact|, with ``exact`` the
float64 product of the same dequantized weight (so the bound also covers the reference's own rounding).
"""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-20}


def _modules():
    from lorakit.quant import nf4
    from lorakit.quant import triton_kernels as tk  # after conftest set TRITON_INTERPRET

    return nf4, tk


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g)).to(DEVICE)


def _check(x, packed, state, bias=None, **knobs):
    nf4, tk = _modules()
    y = tk.gemv_4bit_triton(x, packed, state, bias, **knobs)
    w = nf4.dequantize_4bit(packed, state, x.dtype)  # the exact weight the reference multiplies
    exact = x.double() @ w.double().T + (0.0 if bias is None else bias.double())
    assert y.shape == exact.shape and y.dtype == x.dtype
    err = (y.double() - exact).abs()
    bound = ULP[x.dtype] * exact.abs() + 1e-5 * exact.abs().max()
    assert torch.all(err <= bound), f"max excess {float((err - bound).max())} with {knobs}"
    ref = torch.nn.functional.linear(x, w, bias)  # the path the kernel replaces, within ~1e-2 relative
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-2


CASES = [  # (N, K, M, blocksize, quant_type, double_quant, bias)
    (64, 128, 1, 64, "nf4", True, False),
    (100, 128, 3, 64, "nf4", True, True),  # N not a multiple of the tile
    (64, 192, 1, 128, "nf4", True, True),  # blocks of 128 across rows of 192: groups of 64
    (100, 192, 3, 64, "fp4", False, False),
    (64, 130, 3, 64, "nf4", False, True),  # K = 2 * 65: groups of 2 values, blocks straddle rows
    (100, 130, 1, 128, "fp4", True, False),
    (64, 192, 3, 128, "fp4", True, True),
    (100, 128, 1, 128, "nf4", False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_K{}_M{}_bs{}_{}_dq{}_bias{}".format(*c))
def test_matches_reference(case):
    n, k, m, bs, qt, dq, has_bias = case
    nf4, _ = _modules()
    packed, state = nf4.quantize_4bit(_weight((n, k), n + k), bs, qt, dq)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(DEVICE) if has_bias else None
    _check(x, packed, state, bias)  # default knobs
    _check(x, packed, state, bias, block_n=16, block_k=64, num_warps=2)  # several K steps, small tile


@pytest.mark.parametrize("knobs", [
    {"dot": False},  # per-row FMA reductions for several rows
    {"dot": True, "block_n": 16, "block_k": 64},  # tensor cores, rows padded to 16
    {"split_k": 3, "block_k": 64},  # split-K: fp32 atomics, bias once
    {"block_m": 2, "dot": False},  # rows in chunks: several programs along M
], ids=["fma_rows", "dot", "split_k", "m_chunks"])
def test_paths(knobs):
    nf4, _ = _modules()
    packed, state = nf4.quantize_4bit(_weight((100, 192), 7), 64, "nf4", True)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 192, generator=g).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(100, generator=g).to(torch.bfloat16).to(DEVICE)
    _check(x, packed, state, bias, **knobs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    nf4, _ = _modules()
    packed, state = nf4.quantize_4bit(_weight((64, 192), 9), 64, "nf4", True)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(10)).to(dtype).to(DEVICE)
    _check(x, packed, state, torch.ones(64, dtype=dtype, device=DEVICE))
    _check(x[:1], packed, state)
    if dtype == torch.float16:
        _check(x, packed, state, dot=True)


def test_strided_rows_and_leading_dims():
    nf4, tk = _modules()
    packed, state = nf4.quantize_4bit(_weight((64, 128), 11), 64, "nf4", True)
    base = torch.randn(3, 200, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16).to(DEVICE)
    _check(base[:, :128], packed, state)  # rows 200 apart: read through the stride, as uint32 pairs
    _check(base[:, 1:129], packed, state)  # odd offset: cannot be read as pairs, copied first
    _check(base.t().contiguous().t()[:, :128], packed, state)  # column-major: copied
    x = base[:2, :128].reshape(2, 1, 128)
    assert tk.gemv_4bit_triton(x, packed, state).shape == (2, 1, 64)
    assert tk.gemv_4bit_triton(x[:0], packed, state).shape == (0, 1, 64)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU (the interpreter is far too slow)")
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_real_shapes_on_gpu(shape, m):
    nf4, _ = _modules()
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = nf4.quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(m, shape[1], device="cuda").to(torch.bfloat16)
    _check(x, packed, state)
    _check(x, packed, state, dot=m > 1, split_k=2)
