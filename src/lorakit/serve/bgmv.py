"""Gathered low-rank matmuls: every batch row applies its own adapter (Punica's BGMV, in torch and Triton).

The engine keeps the adapters that sit on the accelerator stacked, one stack per fused projection group of
a decoder layer (q|k|v, o, gate|up, down):

    A       (n_slots, S * R, in)     slice s of the group owns rows [s * R, (s + 1) * R)
    B       (n_slots, N, R)          output column n belongs to slice s(n) (``bounds``: where slices end)
    scales  (n_slots, S)             alpha / r (or alpha / sqrt(r)) per slice; 0 where an adapter skips it

R is the largest rank the engine admits: a smaller adapter is zero-padded, which adds exact zeros. Slot 0
is all zeros (the base model). ``idx`` (rows,) holds each row's slot. Then for row b, with s = slice of n:

    shrink   xa[b, :]  = A[idx[b]] @ x[b]                                   (S * R,), fp32 accumulate
    expand   y[b, n]  += scales[idx[b], s] * (B[idx[b], n, :] @ xa[b, s * R:(s + 1) * R])

``lora_apply_`` picks the implementation: the Triton kernels for decode rows (one token a
row) on CUDA, the pure-torch reference (a gather of each row's A and B, then ``bmm`` on tensor cores)
everywhere else, which is also the oracle the kernels are tested against (TRITON_INTERPRET=1 on a CPU).
Set ``LORAKIT_NO_TRITON=1`` to force the reference.
"""

from __future__ import annotations

import functools

import torch

from .._triton import load_kernels


# ---------------------------------------------------------------------------------------------- reference
def shrink_reference(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (rows, T, in); A: (n_slots, S * R, in); idx: (rows,) -> (rows, T, S * R) in fp32."""
    a = A.index_select(0, idx)  # (rows, S * R, in): one gather per row, not per token
    if x.dtype == torch.float32 and a.dtype == torch.float32:
        return torch.bmm(x, a.transpose(1, 2))
    return torch.bmm(x.float(), a.float().transpose(1, 2))


def expand_reference_(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                      idx: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """y: (rows, T, N) updated in place; xa: (rows, T, S * R) fp32; B: (n_slots, N, R); bounds: slice ends."""
    R = B.shape[-1]
    b = B.index_select(0, idx)  # (rows, N, R)
    s_rows = scales.index_select(0, idx).float()  # (rows, S)
    start = 0
    for s, stop in enumerate(bounds):
        part = torch.bmm(xa[..., s * R:(s + 1) * R], b[:, start:stop].float().transpose(1, 2))  # (rows, T, n_s)
        view = y[..., start:stop]
        view.copy_((view.float() + part * s_rows[:, s, None, None]).to(y.dtype))
        start = stop
    return y


# ---------------------------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=1)
def _triton_kernels():
    return load_kernels("lorakit.serve.bgmv_triton")


def triton_available() -> bool:
    """True when the Triton BGMV kernels can run on CUDA tensors."""
    return _triton_kernels() is not None


def _use_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and x.shape[1] == 1 and _triton_kernels() is not None


def lora_apply_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                idx: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """Shrink then expand into y (in place). On the Triton path the shrink's K-split partial sums go to the
    expand kernel as they are: two launches per projection group, no reduction kernel in between."""
    if _use_triton(x):
        kernels = _triton_kernels()
        kernels.expand_(y[:, 0], kernels.shrink_partials(x[:, 0], A, idx), B, scales, idx, bounds)
        return y
    return expand_reference_(y, shrink_reference(x, A, idx), B, scales, idx, bounds)


__all__ = ["expand_reference_", "lora_apply_", "shrink_reference", "triton_available"]
