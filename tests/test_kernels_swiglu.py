"""kernels/swiglu_triton.py against the torch path of kernels/gated_mlp.py (the same roundings).

On a CPU the kernels run under TRITON_INTERPRET=1 on small shapes, and are also compiled ahead of time for an
sm_90 (H100/H200) and an sm_80 target - Triton's whole compiler down to a cubin, no GPU needed - so a kernel
that the interpreter accepts but the compiler rejects fails here. On a GPU they are compiled and run, and the
whole fused op is checked against the torch path on a Llama-1B-sized slice too. The two differ only where
the exponential inside sigmoid differs in its last fp32 bit, which moves a bf16 result by at most one unit
in the last place.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()  # without one, conftest.py has set TRITON_INTERPRET=1 before this import
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton); the kernels are proven on the GPU run",
                allow_module_level=True)

from lorakit.kernels import gated_mlp
from lorakit.kernels import swiglu_triton as tk

DEVICE = "cuda" if CUDA else "cpu"
ARGS = gated_mlp.MlpArgs(gated_mlp.LoraLinearArgs(1.0), nn.SiLU(), silu=True)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units of the last place of their dtype."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(bits).long(), b.view(bits).long()
    # map the sign-magnitude bit patterns onto a line, so that neighbours differ by one
    top = 1 << (a.element_size() * 8 - 1)
    ia, ib = torch.where(ia < 0, -(ia + top), ia), torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max())


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """16-bit: at most one unit in the last place. fp32: within a few of them, absolutely near zero (the
    exponentials of numpy, Sleef and CUDA differ in the last bit, and a gradient that passes through zero
    keeps that error absolute, not relative)."""
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert ulps(a, b) <= 1


def operands(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 1030), (1, 1)])
@pytest.mark.parametrize("gated", [True, False])
def test_forward_matches_torch(dtype, shape, gated):
    gate, up, _ = operands(shape, dtype)
    up = up if gated else None
    expected = torch.nn.functional.silu(gate) * up if gated else torch.nn.functional.silu(gate)
    close(tk.silu_forward(gate, up), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 1030)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("want_h", [True, False])
def test_backward_matches_torch(dtype, shape, gated, want_h):
    gate, up, grad_h = operands(shape, dtype)
    up = up if gated else None
    act = torch.nn.functional.silu(gate)
    expected_h = act * up if gated else act
    expected_dg = torch.ops.aten.silu_backward(grad_h * up if gated else grad_h, gate)
    h, dg, du = tk.silu_backward(grad_h, gate, up, want_h)
    close(dg, expected_dg)
    if gated:
        close(du, grad_h * act)
    else:
        assert du is None
    if want_h:
        close(h, expected_h)
    else:
        assert h is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("want_h", [True, False])
def test_in_place_backward_writes_the_same_bits_over_its_operands(dtype, gated, want_h):
    """silu_backward(in_place=True): dG over gate, dU over up, H over dH; bit for bit the fresh outputs."""
    gate, up, grad_h = operands((2, 5, 1030), dtype, seed=5)
    up = up if gated else None
    expected = tk.silu_backward(grad_h, gate, up, want_h)
    owned = [t.clone() if t is not None else None for t in (grad_h, gate, up)]
    got = tk.silu_backward(*owned, want_h, in_place=True)
    for e, o, storage in zip(expected, got, owned):
        assert (e is None) == (o is None)
        if e is not None:
            assert torch.equal(o, e)
            assert o.data_ptr() == storage.data_ptr()  # written where the operand was: nothing allocated


def spy_in_place_flag(monkeypatch) -> list[bool]:
    """The ``in_place`` argument of every silu_backward call from here on (gated_mlp passes it last)."""
    calls = []
    real = tk.silu_backward
    monkeypatch.setattr(tk, "silu_backward", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


def in_place_case(dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    n, inter, out, r = 40, 96, 24, 8

    def t(*shape, grad=False, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_(grad)

    leaves = t(n, inter, grad=True), t(n, inter, grad=True)
    weight, A, B = t(out, inter, scale=inter ** -0.5), t(r, inter, grad=True, scale=0.3), t(out, r, grad=True)
    return leaves, weight, A, B, t(n, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_that_owns_its_inputs_gives_the_same_gradients(dtype, monkeypatch):
    """lora_mlp_down(owns_inputs=True) with the kernels (interpreted on the CPU): the in-place backward ran
    and every gradient is bit for bit the op's without it."""
    monkeypatch.setattr(gated_mlp, "_use_triton", lambda *t: True)
    (g0, u0), weight, A, B, grad_y = in_place_case(dtype)
    calls = spy_in_place_flag(monkeypatch)

    def run(owns):
        gate, up = g0 * 1, u0 * 1  # made for the op, as the fused block's shared-input op makes them
        y = gated_mlp.lora_mlp_down(gate, up, nn.SiLU(), weight, None, A, B, 2.0, silu=True, owns_inputs=owns)
        y.backward(grad_y)
        out = [y.detach()] + [t.grad.clone() for t in (g0, u0, A, B)]
        for t in (g0, u0, A, B):
            t.grad = None
        return out

    owned, fresh = run(True), run(False)
    assert calls == [True, False] and gated_mlp._triton is not None
    for a, b in zip(owned, fresh):
        assert torch.equal(a, b)


def test_second_backward_through_an_in_place_op_fails_loudly(monkeypatch):
    """retain_graph: the saved gate and up hold gradients after the first backward; autograd says so."""
    monkeypatch.setattr(gated_mlp, "_use_triton", lambda *t: True)
    (g0, u0), weight, A, B, grad_y = in_place_case(torch.float32)
    y = gated_mlp.lora_mlp_down(g0 * 1, u0 * 1, nn.SiLU(), weight, None, A, B, 2.0, silu=True, owns_inputs=True)
    y.backward(grad_y, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(grad_y)
    monkeypatch.setattr(gated_mlp, "IN_PLACE_BACKWARD", False)  # off: a second backward works
    y = gated_mlp.lora_mlp_down(g0 * 1, u0 * 1, nn.SiLU(), weight, None, A, B, 2.0, silu=True, owns_inputs=True)
    y.backward(grad_y, retain_graph=True)
    y.backward(grad_y)


def test_fused_block_hands_its_own_gate_and_up_to_the_in_place_backward(monkeypatch):
    """A Llama MLP block (shared-input gate/up, then down's op) with the kernels: the in-place backward runs,
    and a training step's loss and gradients are bit for bit those without it."""
    transformers = pytest.importorskip("transformers")
    import lorakit as lk

    monkeypatch.setattr(gated_mlp, "_use_triton", lambda *t: True)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=50, head_dim=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    calls = spy_in_place_flag(monkeypatch)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    loss_in_place, grads_in_place = step()
    monkeypatch.setattr(gated_mlp, "IN_PLACE_BACKWARD", False)
    loss_fresh, grads_fresh = step()
    assert calls == [True, False]
    assert torch.equal(loss_in_place, loss_fresh) and len(grads_fresh) == 6
    for name in grads_fresh:
        assert torch.equal(grads_in_place[name], grads_fresh[name]), name


def op_output_and_grads(gate, up, weight, A, B, grad_y) -> list[torch.Tensor]:
    """The fused SiLU MLP down op's output and the gradients of gate, up, A and B for ``grad_y`` (scale 2,
    no bias); the gradients are cleared again."""
    y = gated_mlp.lora_mlp_down(gate, up, nn.SiLU(), weight, None, A, B, 2.0, silu=True)
    y.backward(grad_y)
    out = [y.detach()] + [t.grad.clone() for t in (gate, up, A, B)]
    for t in (gate, up, A, B):
        t.grad = None
    return out


def lora_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """The fused kernel's rank-r sum runs in another order than torch's matmul: a 16-bit dH can land one unit
    off where the fp32 sum sits on a rounding boundary, and the gradients after it a unit or two."""
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * b.float().abs().max().item())


def lora_operands(shape, dtype, r, gated, seed):
    """gate, up (None unless gated), dH_base of ``shape``; GA (rows x r), A (r x intermediate); the scale."""
    gate, up, base = operands(shape, dtype)
    g = torch.Generator().manual_seed(seed)
    rows = gate.numel() // shape[-1]
    ga = torch.randn(rows, r, generator=g).to(dtype).to(DEVICE)
    A = (torch.randn(r, shape[-1], generator=g) / r ** 0.5).to(dtype).to(DEVICE)
    return gate, up if gated else None, base, ga, A, 0.75


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,r", [((70, 200), 5), ((2, 33, 130), 16), ((3, 129), 32)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("want_h", [True, False])
@pytest.mark.parametrize("tile", [None, (16, 64, 3, 4)])
def test_backward_with_the_lora_term_matches_the_unfused_backward(dtype, shape, r, gated, want_h, tile):
    """silu_backward_lora(dH_base, ..., GA, A, s) = silu_backward(dH_base + s * GA @ A, ...), dH rounded to the
    dtype as the unfused path stores it; ranks under 16 (padded inside), 16 and above; the default launch and
    one of several row tiles a program (the last program's tiles partly or wholly past the rows)."""
    gate, up, base, ga, A, s = lora_operands(shape, dtype, r, gated, seed=3)
    grad_h = (base.float() + s * (ga.float() @ A.float()).view(shape)).to(dtype)
    expected = tk.silu_backward(grad_h, gate, up, want_h)
    got = tk.silu_backward_lora(base, gate, up, want_h, ga, A, s, tile=tile)
    for e, o in zip(expected, got):
        assert (e is None) == (o is None)
        if e is not None:
            lora_close(o, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,r", [((70, 200), 5), ((2, 33, 130), 16)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("tile", [None, (16, 64, 2, 4)])
def test_backward_with_da_folded_in_matches_the_unfused_backward(dtype, shape, r, gated, tile):
    """silu_backward_lora_da: dG, dU as silu_backward_lora, and dA = s * GA^T @ H (H as silu_backward recomputes
    it) summed over the row chunks; chunks of one and of several row tiles, the last partly past the rows."""
    gate, up, base, ga, A, s = lora_operands(shape, dtype, r, gated, seed=4)
    h, dg, du = tk.silu_backward_lora(base, gate, up, True, ga, A, s)
    expected_da = (s * ga.float().t() @ h.reshape(ga.shape[0], -1).float()).to(dtype)
    got_dg, got_du, got_da = tk.silu_backward_lora_da(base, gate, up, ga, A, s, tile=tile)
    # close, not equal: another tile sums the rank-r term's products in another order (on the CPU the
    # interpreter's numpy matmul; one AMD EPYC machine gave last-bit differences in fp32)
    lora_close(got_dg, dg)
    assert (du is None) == (got_du is None)
    if du is not None:
        lora_close(got_du, du)
    lora_close(got_da, expected_da)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fold_da", [False, True])
def test_fused_dh_op_matches_the_unfused_op(dtype, fold_da, monkeypatch):
    """lora_mlp_down with gated_mlp.FUSED_DH_LORA (the rank-r term of dH inside the SiLU backward kernel)
    against the same op without it: output and every gradient (on the CPU the kernels run interpreted)."""
    monkeypatch.setattr(gated_mlp, "_use_triton", lambda *t: True)
    g = torch.Generator().manual_seed(0)
    n, inter, out, r = 40, 96, 24, 8

    def t(*shape, grad=False, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_(grad)

    gate, up = t(n, inter, grad=True), t(n, inter, grad=True)
    weight, A, B = t(out, inter, scale=inter ** -0.5), t(r, inter, grad=True, scale=0.3), t(out, r, grad=True)
    grad_y = t(n, out)

    def run(fused):
        monkeypatch.setattr(gated_mlp, "FUSED_DH_LORA", fused)
        return op_output_and_grads(gate, up, weight, A, B, grad_y)

    calls = []
    name = "silu_backward_lora_da" if fold_da else "silu_backward_lora"
    real = getattr(tk, name)
    monkeypatch.setattr(tk, name, lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gated_mlp, "FUSED_DA_LORA", fold_da)
    fused = run(True)
    assert calls == [1] and gated_mlp._triton is not None  # the fused kernel ran (no fallback)
    for a, b in zip(fused, run(False)):
        lora_close(a, b)


def test_supported_rejects_what_the_kernels_cannot_take():
    a = torch.zeros(4, 6, device=DEVICE)
    assert tk.supported(a, a.clone(), None)
    assert not tk.supported(a, a.t().contiguous().t())  # strided
    assert not tk.supported(a, a[:, :3].contiguous())  # another shape
    assert not tk.supported(a, a.double())
    assert not tk.supported(a.to(torch.int32))


@pytest.mark.skipif(not CUDA, reason="the dispatch to the kernels happens on CUDA tensors only")
def test_fused_op_on_cuda_matches_torch_path(monkeypatch):
    torch.manual_seed(0)
    n, inter, out, r = 4096, 8192, 2048, 16
    gate, up = (torch.randn(n, inter, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "gu")
    weight = torch.randn(out, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    A = (torch.randn(r, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5).requires_grad_(True)
    B = (torch.randn(out, r, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_(True)
    grad_y = torch.randn(n, out, device="cuda", dtype=torch.bfloat16)

    fast = op_output_and_grads(gate, up, weight, A, B, grad_y)
    monkeypatch.setattr(gated_mlp, "_use_triton", lambda *t: False)
    slow = op_output_and_grads(gate, up, weight, A, B, grad_y)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


AOT = textwrap.dedent("""
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lorakit.kernels import swiglu_triton as k

    arch = int(sys.argv[1])
    for dt, tdt in [("bf16", tl.bfloat16), ("fp16", tl.float16), ("fp32", tl.float32)]:
        for gated in (True, False):
            fixed = {"GATED": gated, "DTYPE": tdt, "BLOCK": k._BLOCK}
            sig = {"g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "h_ptr": f"*{dt}", "n": "i64"}
            kernels = [(k._silu_fwd, sig, fixed)]
            for want_h in (True, False):
                sig_b = {"dh_ptr": f"*{dt}", "g_ptr": f"*{dt}", "u_ptr": f"*{dt}", "h_ptr": f"*{dt}",
                         "dg_ptr": f"*{dt}", "du_ptr": f"*{dt}", "n": "i64"}
                kernels.append((k._silu_bwd, sig_b, {**fixed, "WANT_H": want_h}))
            sig_l = {name: f"*{dt}" for name in ("dh_ptr", "ga_ptr", "a_ptr", "g_ptr", "u_ptr", "h_ptr", "dg_ptr",
                                                  "du_ptr")} | {"da_ptr": "*fp32", "M": "i32", "N": "i32",
                                                                "R": "i32", "scale": "fp32"}
            for tile, fold_da in ((k._TILE, False), ((16, 128, 8, 4), False), (k._TILE_DA, True)):
                kernels.append((k._silu_bwd_lora, sig_l, {"GATED": gated, "WANT_H": not fold_da, "DTYPE": tdt,
                                                          "IEEE": dt == "fp32", "BLOCK_M": tile[0],
                                                          "BLOCK_N": tile[1], "R_PAD": 16,
                                                          "ROW_STEPS": tile[2], "FOLD_DA": fold_da}))
            for fn, signature, constexprs in kernels:
                signature = {**signature, **{name: "constexpr" for name in constexprs}}
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options=dict(k._LAUNCH))
                assert compiled.asm["cubin"], (fn, dt, gated)
    print("compiled")
""")


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_real_gpus(arch, tmp_path):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not find a cached binary
    result = subprocess.run([sys.executable, "-c", AOT, str(arch)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
