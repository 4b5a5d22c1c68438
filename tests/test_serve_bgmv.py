"""lorakit.serve.bgmv: the gathered per-row LoRA matmul (torch reference and Triton kernels).

The reference is checked against an explicit float64 loop over rows and slices (the maths in bgmv.py's
docstring); the Triton kernels against the reference, on the CPU under TRITON_INTERPRET=1 with small shapes
and on a GPU with Llama-1B shapes.
"""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernels are defined

from lorakit.serve import bgmv

DEVICE = "cuda" if CUDA else "cpu"


def stacks(n_slots, R, K, outs, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S, N = len(outs), sum(outs)
    A = torch.randn(n_slots, S * R, K, generator=g)
    B = torch.randn(n_slots, N, R, generator=g)
    scales = torch.rand(n_slots, S, generator=g) + 0.5
    A[0], B[0], scales[0] = 0, 0, 0  # slot 0 is the base model
    bounds = tuple(sum(outs[:i + 1]) for i in range(S))
    return A.to(device, dtype), B.to(device, dtype), scales.to(device), bounds


def explicit(x, y, A, B, scales, idx, bounds):
    """y[b, t, n] + scales[slot, s] * B[slot, n, :] @ A[slot, s*R:(s+1)*R, :] @ x[b, t] in float64, row by row."""
    R = B.shape[-1]
    out = y.double().clone()
    start = 0
    for s, stop in enumerate(bounds):
        for b in range(x.shape[0]):
            slot = int(idx[b])
            a = A[slot, s * R:(s + 1) * R].double()
            bb = B[slot, start:stop].double()
            out[b, :, start:stop] += scales[slot, s].double() * (x[b].double() @ a.T @ bb.T)
        start = stop
    return out


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("outs", [(24,), (24, 8, 8), (40, 40)])
def test_reference_matches_explicit_loop(T, outs):
    A, B, scales, bounds = stacks(5, 4, 16, outs, torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, T, 16, generator=g)
    y = torch.randn(6, T, sum(outs), generator=g)
    idx = torch.tensor([3, 0, 1, 3, 4, 2])
    want = explicit(x, y, A, B, scales, idx, bounds)
    xa = bgmv.shrink_reference(x, A, idx)
    got = bgmv.expand_reference_(y.clone(), xa, B, scales, idx, bounds)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
    # rows on slot 0 are untouched bit for bit
    assert torch.equal(got[1], y[1])


def test_zero_padded_rank_is_exact():
    """An adapter of rank 3 in stacks of rank 8 (zero rows of A, zero columns of B) gives the unpadded result."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 16, generator=g), torch.randn(20, 3, generator=g)
    A = torch.zeros(2, 8, 16)
    B = torch.zeros(2, 20, 8)
    A[1, :3], B[1, :, :3] = a, b
    scales = torch.tensor([[0.0], [0.7]])
    x = torch.randn(4, 1, 16, generator=g)
    y = torch.zeros(4, 1, 20)
    idx = torch.ones(4, dtype=torch.long)
    got = bgmv.expand_reference_(y, bgmv.shrink_reference(x, A, idx), B, scales, idx, (20,))
    assert torch.allclose(got, 0.7 * (x @ a.T @ b.T), atol=1e-5)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed; the kernels are proven on the GPU run")


@needs_triton
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("shape", [(4, 8, 40, (24, 8, 8)), (3, 4, 300, (300,)), (5, 16, 64, (130, 130)),
                                   (3, 4, 2100, (48,))])  # K split in two uneven parts
def test_triton_matches_reference(dtype, atol, shape):
    from lorakit.serve import bgmv_triton

    n_slots, R, K, outs = shape
    A, B, scales, bounds = stacks(n_slots, R, K, outs, dtype, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    rows = 7
    x = torch.randn(rows, K, generator=g).to(DEVICE, dtype)
    y = torch.randn(rows, sum(outs), generator=g).to(DEVICE, dtype)
    idx = torch.tensor([1, 0, n_slots - 1, 1, 2, 0, n_slots - 1][:rows], device=DEVICE)
    xa_ref = bgmv.shrink_reference(x[:, None], A, idx)[:, 0]
    xa = bgmv_triton.shrink(x, A, idx)
    assert torch.allclose(xa, xa_ref, atol=1e-3 * K ** 0.5, rtol=1e-3)
    y_ref = bgmv.expand_reference_(y[:, None].clone(), xa_ref[:, None], B, scales, idx, bounds)[:, 0]
    y_got = bgmv_triton.expand_(y.clone(), xa_ref, B, scales, idx, bounds)
    assert torch.allclose(y_got.float(), y_ref.float(), atol=atol, rtol=1e-2)
    assert torch.equal(y_got[idx == 0], y[idx == 0])  # base rows untouched


@needs_triton
def test_triton_writes_into_a_strided_view():
    """The engine hands the kernel a (rows, N) view of a (rows, 1, N) tensor; other columns stay as they were."""
    from lorakit.serve import bgmv_triton

    A, B, scales, bounds = stacks(3, 4, 32, (16, 16), torch.float32, device=DEVICE)
    big = torch.randn(5, 1, 48, device=DEVICE)
    view = big[:, 0, 8:40]
    before = big.clone()
    idx = torch.tensor([1, 2, 1, 0, 2], device=DEVICE)
    x = torch.randn(5, 32, device=DEVICE)
    xa = bgmv_triton.shrink(x, A, idx)
    want = bgmv.expand_reference_(view.clone()[:, None], xa[:, None], B, scales, idx, bounds)[:, 0]
    bgmv_triton.expand_(view, xa, B, scales, idx, bounds)
    assert torch.allclose(big[:, 0, 8:40], want, atol=1e-4)
    assert torch.equal(big[:, 0, :8], before[:, 0, :8]) and torch.equal(big[:, 0, 40:], before[:, 0, 40:])


@pytest.mark.skipif(not CUDA, reason="needs a GPU: Llama-1B shapes with bf16 stacks")
def test_triton_llama_1b_shapes_on_gpu():
    from lorakit.serve import bgmv_triton

    for K, outs in [(2048, (2048, 512, 512)), (2048, (8192, 8192)), (8192, (2048,))]:
        A, B, scales, bounds = stacks(33, 16, K, outs, torch.bfloat16, device="cuda")
        idx = torch.randint(0, 33, (64,), device="cuda")
        x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(64, sum(outs), device="cuda", dtype=torch.bfloat16)
        xa_ref = bgmv.shrink_reference(x[:, None], A, idx)[:, 0]
        assert torch.allclose(bgmv_triton.shrink(x, A, idx), xa_ref, atol=0.5, rtol=1e-2)
        y_ref = bgmv.expand_reference_(y[:, None].clone(), xa_ref[:, None], B, scales, idx, bounds)[:, 0]
        y_got = bgmv_triton.expand_(y.clone(), xa_ref, B, scales, idx, bounds)
        assert torch.allclose(y_got.float(), y_ref.float(), atol=0.5, rtol=2e-2)


@needs_triton
def test_expand_sums_the_shrink_partials_itself():
    """The engine's path: shrink_partials -> expand_ (no reduction kernel) equals the reference, for groups
    of 1, 2 and 3 slices and blocks of outputs that straddle a slice boundary."""
    from lorakit.serve import bgmv_triton

    for outs, block_n in [((24, 8, 8), 16), ((40, 40), 32), ((48,), 16)]:
        A, B, scales, bounds = stacks(4, 16, 96, outs, torch.float32, seed=5, device=DEVICE)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(5, 96, generator=g).to(DEVICE)
        y = torch.randn(5, sum(outs), generator=g).to(DEVICE)
        idx = torch.tensor([1, 0, 3, 2, 1], device=DEVICE)
        want = bgmv.expand_reference_(y[:, None].clone(), bgmv.shrink_reference(x[:, None], A, idx), B, scales,
                                      idx, bounds)[:, 0]
        parts = bgmv_triton.shrink_partials(x, A, idx, block_k=32, splits=3)
        assert parts.shape == (3, 5, len(outs) * 16)
        got = bgmv_triton.expand_(y.clone(), parts, B, scales, idx, bounds, block_n=block_n)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


_SM90_BUILD = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorakit.serve import bgmv_triton as k

ints = lambda *names: {n: "i32" for n in names}
expand = {"xa_ptr": "*fp32", "b_ptr": "*bf16", "idx_ptr": "*i64", "scale_ptr": "*fp32", "y_ptr": "*bf16",
          **ints("N", "R", "N0", "N1", "R1", "R2", "sxa_p", "sxa_b", "sxa_r", "sb_n", "sb_o", "sb_r", "ss_n",
                 "ss_s", "sy_b", "sy_o"), "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "SPLITS": "constexpr"}
shrink = {"x_ptr": "*bf16", "a_ptr": "*bf16", "idx_ptr": "*i64", "out_ptr": "*fp32",
          **ints("K", "RR", "K_PER_SPLIT", "sx_b", "sx_k", "sa_n", "sa_r", "sa_k", "so_s", "so_b", "so_r"),
          "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
builds = [(k._expand_kernel, expand, {"BLOCK_N": 128, "BLOCK_R": 16, "SPLITS": s}) for s in (1, 8)]
builds.append((k._shrink_kernel, shrink, {"BLOCK_R": 16, "BLOCK_K": 256}))
for fn, signature, constexprs in builds:
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 1000
print("built", len(builds))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the maths, not that the kernels build for a real GPU: compile them for an H100
    (sm_90) ahead of time with Triton's bundled ptxas (in a child process: this one runs the interpreter), so
    a GPU-only compile error shows up on a CPU too."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_BUILD], env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "GPUTarget" in proc.stderr):
        pytest.skip("no ahead-of-time CUDA compile here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built 3" in proc.stdout
