"""Host time of single ops on small CUDA tensors (the GPU's work negligible): what each op of a LoRA layer
costs the CPU that launches it. Many back-to-back calls without a sync, wall time per call.

    python bench/op_cost.py
"""

from __future__ import annotations

import torch
from common import host_us_per_call


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(64, 128, device=dev, dtype=dt)
    w = torch.randn(128, 128, device=dev, dtype=dt)
    a = torch.randn(16, 128, device=dev, dtype=dt)
    b = torch.randn(128, 16, device=dev, dtype=dt)
    xa = x @ a.t()
    y = torch.empty(64, 128, device=dev, dtype=dt)
    bias = torch.randn(128, device=dev, dtype=dt)
    xr = torch.randn(64, 128, device=dev, dtype=dt, requires_grad=True)
    wr = w.clone().requires_grad_(False)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    ops = {
        "empty kernel-free view (x.t())": lambda: x.t(),
        "x.reshape(-1, 128)": lambda: x.reshape(-1, 128),
        "torch.mul(b, 2.0, out=)": lambda: torch.mul(b, 2.0, out=b),
        "x + x (elementwise)": lambda: x + x,
        "torch.cat([x, xa], 1)": lambda: torch.cat([x, xa], 1),
        "x @ w.t() (mm)": lambda: x @ w.t(),
        "torch.mm(x, w.t())": lambda: torch.mm(x, w.t()),
        "x @ a.t() (mm, N=16)": lambda: x @ a.t(),
        "torch.addmm(y, x, w.t()) (beta=1)": lambda: torch.addmm(y, x, w.t()),
        "y.addmm_(x, w.t(), beta=0.5)": lambda: y.addmm_(x, w.t(), beta=0.5),
        "torch.addmm(a, xa.t(), x, beta=0, alpha=2)": lambda: torch.addmm(a, xa.t(), x, beta=0, alpha=2.0),
        "torch.addmm(bias, x, w.t()) (1-D bias: Lt epilogue)": lambda: torch.addmm(bias, x, w.t()),
        "F.linear(x, w)": lambda: torch.nn.functional.linear(x, w),
        "autograd.Function apply (view)": lambda: Identity.apply(xr),
        "F.linear(xr, w) fwd+bwd": lambda: torch.nn.functional.linear(xr, wr).sum().backward(),
    }
    print(f"host us per call, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| op | us |")
    print("|---|---|")
    for name, fn in ops.items():
        print(f"| {name} | {host_us_per_call(fn, 2000, repeats=3, warmup=50):.1f} |", flush=True)


if __name__ == "__main__":
    main()
