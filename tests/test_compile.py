"""torch.compile on lorakit models: one graph (fullgraph=True, no graph break), same numbers as eager.

* a LoRA-injected Llama-shaped stack (attention + gated MLP projections), training mode, fused LoRA path;
* the same stack quantized to 4 bits (Linear4bit bases) with LoRA on top, forward and backward;
* the 4-bit custom ops (``torch.ops.lorakit.*``) pass torch.library.opcheck and work on meta tensors.

Most compiles use backend="aot_eager" (Dynamo + AOTAutograd, the part that decides graph breaks and traces
the backward; the same kernels as eager, so results are bit-identical); one uses inductor, whose code may
reorder sums: it is compared with a tolerance.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.quant import dispatch, nf4, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cuda: the Triton kernels inside the ops
DIM, HIDDEN, HEADS = 32, 48, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    """A Llama decoder layer in miniature: RMSNorm, causal attention, RMSNorm, SiLU-gated MLP."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(DIM, DIM, bias=False) for _ in "qkvo")
        self.gate_proj, self.up_proj = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, DIM, bias=True)  # one bias: the 4-bit layer's bias path too
        self.norm1, self.norm2 = nn.RMSNorm(DIM), nn.RMSNorm(DIM)

    def qkv(self):
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, HEADS, -1).transpose(1, 2) for p in self.qkv())
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, DIM)
        x = x + self.o_proj(a)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def stack(quantized=False, device="cpu", seed=0):
    """Two blocks with LoRA r=4 on every projection, B random (zero B would hide half the gradients)."""
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block())
    if quantized:
        lk.qlora.quantize_model(model, quantize_head=True)  # no head here: the last Linear is a down_proj
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.to(device).train()


def inputs(seed=1, device="cpu"):
    x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(seed))
    return x.to(device).requires_grad_(True)


class Recorder:
    """A torch.compile backend that keeps the Dynamo graphs, then runs them through aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    def targets(self):
        """Every function called, in the graphs and their subgraphs (an autograd Function's forward body)."""
        modules = [m for g in self.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
        return {str(n.target) for m in modules for n in m.graph.nodes if n.op == "call_function"}


def run(model, x, fn=None):
    """Output, input gradient and the trainable parameters' gradients of sum(y^2), y = (fn or model)(x)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = (fn or model)(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * len(TARGETS) and all(g is not None for g in grads.values())  # A and B, 2 layers
    return y.detach(), x.grad, grads


def autograd_nodes(y):
    """Names of every node of y's backward graph."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


def assert_same(eager, compiled, atol=0.0, rtol=0.0):
    (y0, gx0, g0), (y1, gx1, g1) = eager, compiled
    torch.testing.assert_close(y1, y0, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx1, gx0, atol=atol, rtol=rtol)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("quantized,device", [(False, "cpu")] + [(True, d) for d in DEVICES],
                         ids=lambda v: {False: "lora", True: "qlora"}.get(v, v))
def test_fullgraph_training_step_matches_eager(quantized, device):
    model, x = stack(quantized, device), inputs(device=device)
    eager = run(model, x)
    assert "LoraLinearFunctionBackward" in autograd_nodes(model(x))  # the fused path, not the reference one
    backend = Recorder()
    compiled = run(model, x, torch.compile(model, backend=backend, fullgraph=True))
    assert len(backend.graphs) == 1  # fullgraph=True would raise on a break; one graph, no recompile
    assert "autograd_function_apply" in backend.targets()  # the fused Function, traced inline
    if quantized:
        assert "lorakit.dequantize_4bit.default" in backend.targets()  # the custom op, one node per layer
    if device == "cpu":
        assert_same(eager, compiled)  # aot_eager runs the same kernels: bit-identical
    else:  # the same too, unless a cuBLAS/SDPA heuristic picks another algorithm for the traced call
        assert_same(eager, compiled, atol=1e-6, rtol=1e-5)


def test_explain_reports_no_graph_break():
    model, x = stack(quantized=True), inputs()
    report = torch._dynamo.explain(model)(x)
    assert (report.graph_count, report.graph_break_count, report.break_reasons) == (1, 0, [])
    with torch.no_grad():  # inference (eval, no autograd): still one graph
        report = torch._dynamo.explain(model.eval())(x)
    assert (report.graph_count, report.graph_break_count) == (1, 0)


def test_inductor_fullgraph_matches_eager(tmp_path, monkeypatch):
    """A real inductor compile of two 4-bit LoRA layers (inference, fp32): the 4-bit op and the matmuls become
    inductor's extern kernels. No activation in between on purpose: a generated C++ kernel (SiLU) would cost
    another ~7 s of C++ compiler on a 2-core CI machine and tests inductor more than lorakit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # cold: what CI pays
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM))
    lk.qlora.quantize_model(model, quantize_head=True)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    compiled = torch.compile(model.eval(), fullgraph=True)  # backend="inductor"
    x = inputs().detach()
    with torch.no_grad():
        y0, y1 = model(x), compiled(x)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)  # inductor may sum in another order


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_gemv_op_is_differentiable(device):
    """dispatch.gemv_4bit (the decode path on CUDA) in a compiled graph: same output and gradients."""
    lin = nn.Linear(64, 24).to(device)
    packed, state = nf4.quantize_4bit(lin.weight.detach(), 64, "nf4", True)
    bias = lin.bias.detach().clone().requires_grad_(True)
    x = torch.randn(3, 64, device=device, requires_grad=True)

    def f(x, bias):
        return dispatch.gemv_4bit(x, packed, state, bias)

    y0 = f(x, bias)
    g0 = torch.autograd.grad(y0.square().sum(), (x, bias))
    backend = Recorder()
    y1 = torch.compile(f, backend=backend, fullgraph=True)(x, bias)
    g1 = torch.autograd.grad(y1.square().sum(), (x, bias))
    assert "lorakit.gemv_4bit.default" in backend.targets()
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    torch.testing.assert_close(g1, g0, atol=0, rtol=0)
    w = nf4.dequantize_4bit(packed, state, torch.float32)
    torch.testing.assert_close(g0[0], (2 * y0) @ w, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- the ops
OP_CASES = [((33, 70), 64, "nf4", True), ((16, 64), 32, "fp4", False), ((5, 7), 64, "nf4", False)]


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[2]}-dq{int(c[3])}")
def test_ops_pass_opcheck(case):
    shape, bs, qt, dq = case
    packed, state = nf4.quantize_4bit(torch.randn(shape), bs, qt, dq)
    args = ops.state_args(state)
    torch.library.opcheck(torch.ops.lorakit.dequantize_4bit.default, (packed, *args, torch.bfloat16))
    if shape[1] % 2 == 0:
        x = torch.randn(2, 3, shape[1], requires_grad=True)
        bias = torch.randn(shape[0], requires_grad=True)
        for b in (bias, None):
            torch.library.opcheck(torch.ops.lorakit.gemv_4bit.default,
                                  (x, packed, *args[:5], b, *args[5:], torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_and_the_ops_give_the_reference_bits(device):
    """dispatch (which on CUDA calls the op's kernel directly when eager) = the op = the reference."""
    packed, state = nf4.quantize_4bit(torch.randn(33, 70, device=device), 64, "nf4", True)
    args = ops.state_args(state)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = nf4.dequantize_4bit(packed, state, dtype)
        op = torch.ops.lorakit.dequantize_4bit(packed, *args, dtype)
        for out in (dispatch.dequantize(packed, state, dtype), op):
            assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert torch.equal(dispatch.dequantize(packed, state), nf4.dequantize_4bit(packed, state))  # its dtype
    x, bias = torch.randn(2, 70, device=device), torch.randn(33, device=device)
    with torch.no_grad():
        fast = dispatch.gemv_4bit(x, packed, state, bias)
        op = torch.ops.lorakit.gemv_4bit(x, packed, *args[:5], bias, *args[5:], state.dtype)
    assert torch.equal(fast, op)


def test_ops_on_meta_tensors():
    packed, state = nf4.quantize_4bit(torch.randn(33, 70), 64, "nf4", True)
    meta = dispatch.dequantize(packed.to("meta"), state.to("meta"), torch.bfloat16)  # the fake implementation
    assert (meta.device.type, meta.shape, meta.dtype) == ("meta", (33, 70), torch.bfloat16)
    x = torch.randn(2, 5, 70, device="meta")
    assert dispatch.gemv_4bit(x, packed.to("meta"), state.to("meta")).shape == (2, 5, 33)


def test_no_triton_switch(monkeypatch):
    monkeypatch.setenv("LORAKIT_NO_TRITON", "1")
    ops.triton_module.cache_clear()
    try:
        assert not dispatch.triton_available()
        if torch.cuda.is_available():  # the CUDA kernel of the op then runs the reference
            packed, state = nf4.quantize_4bit(torch.randn(33, 70, device="cuda"), 64, "nf4", True)
            assert torch.equal(dispatch.dequantize(packed, state), nf4.dequantize_4bit(packed, state))
    finally:
        ops.triton_module.cache_clear()
