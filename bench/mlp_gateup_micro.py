"""Micro-benchmark: ways to compute a LoRA gate/up pair that share one input (Llama-3.2-1B MLP, 4 x 2048
tokens, r=16, bf16), forward products and the backward's dX / dA, against the frozen projections alone.

Decides whether a gate/up fusion inside the MLP block pays before it is built: each row times one variant
with CUDA events (median of 50 after 10 warm-up) and prints the extra microseconds over the frozen base."""

from __future__ import annotations

import argparse

import torch
from common import cuda_event_us as timed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=8192)
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args()
    N, K, M, r, s = args.tokens, args.hidden, args.inter, args.r, 2.0
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02

    x = rnd(N, K)
    Wg, Wu = rnd(M, K), rnd(M, K)
    Ag, Au, Bg, Bu = rnd(r, K), rnd(r, K), rnd(M, r), rnd(M, r)
    dG, dU = rnd(N, M), rnd(N, M)
    Acat = torch.cat([Ag, Au])
    Wg_cat = torch.cat([Wg, s * Bg, torch.zeros(M, r, device=dev, dtype=dt)], 1)
    Wu_cat = torch.cat([Wu, torch.zeros(M, r, device=dev, dtype=dt), s * Bu], 1)
    Wg_cat2 = torch.empty(M, K + r, device=dev, dtype=dt)

    rows = {}
    # ---- forward
    rows["fwd floor: x@Wg.T, x@Wu.T"] = timed(lambda: (x @ Wg.t(), x @ Wu.t()))

    def fwd_now():
        for W, A, B in ((Wg, Ag, Bg), (Wu, Au, Bu)):
            xa = x @ A.t()
            (xa @ B.t()).addmm_(x, W.t(), beta=s)

    rows["fwd now: per projection xa, (xa@B.T) + x@W.T"] = timed(fwd_now)

    def fwd_shared_xa():
        xa = x @ Acat.t()
        (xa[:, :r] @ Bg.t()).addmm_(x, Wg.t(), beta=s)
        (xa[:, r:] @ Bu.t()).addmm_(x, Wu.t(), beta=s)

    rows["fwd shared XA (one x@[Ag;Au].T)"] = timed(fwd_shared_xa)

    def fwd_kcat_stored():  # weights kept concatenated (not possible without re-pointing the params)
        xa = x @ Acat.t()
        xc = torch.cat([x, xa], 1)
        xc @ Wg_cat.t(), xc @ Wu_cat.t()

    rows["fwd K-concat, concatenated weights stored"] = timed(fwd_kcat_stored)

    def fwd_kcat_copy():  # weights concatenated every call: [W | sB] copies W
        xa = x @ Acat.t()
        for W, B, lo in ((Wg, Bg, 0), (Wu, Bu, r)):
            xc = torch.cat([x, xa[:, lo:lo + r]], 1)
            Wg_cat2[:, :K].copy_(W)
            torch.mul(B, s, out=Wg_cat2[:, K:])
            xc @ Wg_cat2.t()

    rows["fwd K-concat, [W | sB] copied per call"] = timed(fwd_kcat_copy)

    # ---- backward dX
    rows["dX floor: dG@Wg + dU@Wu (two GEMMs + add)"] = timed(lambda: dG @ Wg + dU @ Wu)
    rows["dX floor chained (addmm beta=1)"] = timed(lambda: (dG @ Wg).addmm_(dU, Wu))

    def dx_now():
        outs = []
        for d, W, A, B in ((dG, Wg, Ag, Bg), (dU, Wu, Au, Bu)):
            ga = d @ B
            outs.append((ga @ A).addmm_(d, W, beta=s))
        return outs[0] + outs[1]

    rows["dX now: per projection (GA@A) + dY@W, then add"] = timed(dx_now)

    def dx_chain():
        ga = torch.cat([dG @ Bg, dU @ Bu], 1)
        return (ga @ Acat).addmm_(dG, Wg, beta=s).addmm_(dU, Wu)

    rows["dX chained: [GAg|GAu]@[Ag;Au], +dG@Wg, +dU@Wu"] = timed(dx_chain)

    # ---- backward dA (GA given)
    gag, gau = dG @ Bg, dU @ Bu
    gcat = torch.cat([gag, gau], 1)
    rows["dA now: two GA.T@x"] = timed(lambda: (torch.addmm(Ag, gag.t(), x, beta=0, alpha=s),
                                                 torch.addmm(Au, gau.t(), x, beta=0, alpha=s)))
    rows["dA shared: [GAg|GAu].T@x (cat incl.)"] = timed(
        lambda: torch.addmm(Acat, torch.cat([gag, gau], 1).t(), x, beta=0, alpha=s))
    rows["dA shared, GA already concatenated"] = timed(lambda: torch.addmm(Acat, gcat.t(), x, beta=0, alpha=s))

    # ---- the parts of one projection's forward, timed alone
    xa = x @ Ag.t()
    xa2 = x @ Acat.t()
    xc = torch.cat([x, xa2], 1)
    pad = 64 - (K + 2 * r) % 64 if (K + 2 * r) % 64 else 0
    xcp = torch.cat([x, xa2, torch.zeros(N, pad, device=dev, dtype=dt)], 1)
    Wcp = torch.cat([Wg_cat, torch.zeros(M, pad, device=dev, dtype=dt)], 1)
    c = xa @ Bg.t()
    y = x @ Wg.t()
    rows["part: x@W.T (frozen GEMM)"] = timed(lambda: x @ Wg.t())
    rows["part: x@A.T (N x r)"] = timed(lambda: x @ Ag.t())
    rows["part: x@[Ag;Au].T (N x 2r)"] = timed(lambda: x @ Acat.t())
    rows["part: xa@B.T (writes N x M)"] = timed(lambda: xa @ Bg.t())
    rows["part: C.addmm_(x, W.T, beta=s) (epilogue reads C)"] = timed(lambda: c.addmm_(x, Wg.t(), beta=s))
    rows["part: y.addmm_(xa, B.T, alpha=s) (after)"] = timed(lambda: y.addmm_(xa, Bg.t(), alpha=s))
    rows["part: cat([x, xa2]) (N x (K+2r))"] = timed(lambda: torch.cat([x, xa2], 1))
    rows[f"part: K-concat GEMM, K={K + 2 * r}"] = timed(lambda: xc @ Wg_cat.t())
    rows[f"part: K-concat GEMM, K padded to {K + 2 * r + pad}"] = timed(lambda: xcp @ Wcp.t())
    Wview = Wg_cat[:, :K]
    rows["part: x@W.T with W a view of [W | sB | 0] (ld K+2r)"] = timed(lambda: x @ Wview.t())
    xv = xc[:, :K]
    rows["part: x@W.T with x a view of [x | xa] (ld K+2r)"] = timed(lambda: xv @ Wg.t())
    ga = dG @ Bg
    rows["part: dY@B (N x r, reads dY)"] = timed(lambda: dG @ Bg)
    rows["part: GA@A (writes N x K)"] = timed(lambda: ga @ Ag)
    rows["part: dY@W (frozen dX GEMM)"] = timed(lambda: dG @ Wg)
    rows["part: dB = dY.T@xa (reads dY)"] = timed(lambda: torch.addmm(Bg, dG.t(), xa, beta=0, alpha=s))

    print(f"gate/up pair, N={N} K={K} M={M} r={r}, bf16, {torch.cuda.get_device_name()}; us per call (median of 50)")
    for name, us in rows.items():
        print(f"| {name:52s} | {us:9.1f} |")


if __name__ == "__main__":
    main()
