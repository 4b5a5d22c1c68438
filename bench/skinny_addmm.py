"""The shared-input op's last dX pass, dX = dX_base + [s GA] @ [A_1; ...; A_n] (K = the group's summed rank),
out of place (torch.addmm: PyTorch first copies dX_base into the new output, then the GEMM reads and writes it)
against in place (dX_base.addmm_), with dX_base contiguous (gemm_choice's split backward) or a column slice of
the widened gradient (its widened backward). CUDA events, median of 50 calls each; 1B shape: 8192 tokens,
2048 features, K = 32 (gate/up) and 48 (q/k/v).

    python bench/skinny_addmm.py
"""

import torch
from common import cuda_event_us as timed


def main():
    m, k = 8192, 2048
    dt = torch.bfloat16
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; M={m}, N={k}, bf16; us per call (median of 50)")
    print("| K | addmm, contiguous | addmm_, contiguous | addmm, widened slice | addmm_, widened slice |")
    print("|---|---|---|---|---|")
    for r in (32, 48):
        wide = torch.randn(m, k + r, device="cuda", dtype=dt)
        base = wide[:, :k].contiguous()
        sga, a = torch.randn(m, r, device="cuda", dtype=dt), torch.randn(r, k, device="cuda", dtype=dt)
        ref = torch.addmm(base, sga, a)
        view = wide[:, :k]
        for got in (base.clone().addmm_(sga, a), wide.clone()[:, :k].addmm_(sga, a)):
            torch.testing.assert_close(got, ref)
        cells = [timed(lambda: torch.addmm(base, sga, a)), timed(lambda: base.addmm_(sga, a, beta=1)),
                 timed(lambda: torch.addmm(view, sga, a)), timed(lambda: view.addmm_(sga, a, beta=1))]
        print(f"| {r} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
