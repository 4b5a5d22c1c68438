"""kernels.gemm_choice: every GEMM order an op can pick computes the same values, and the choice is measured
once per shape, kept, and never made where it cannot be measured.

On the CPU the default variant runs, so the other orders are forced here (``FORCE``) and the existing
float64 checks of each op are run again under them: the per-layer op against the reference path (1e-12), its
GPT-2 transposed weight, the MLP down op's gradcheck, and the shared-input op's gradcheck and model-level
comparison with the per-layer path.
"""

from __future__ import annotations

import pytest
import torch
import test_blocks
import test_kernels_lora_linear

from lorakit import blocks
from lorakit.kernels import gemm_choice, lora_linear


@pytest.fixture(params=[0, 1], ids=["default order", "other order"])
def variant(request, monkeypatch):
    monkeypatch.setattr(gemm_choice, "FORCE", request.param)
    return request.param


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_per_layer_op_in_every_order(variant, dropout, bias, monkeypatch):
    test_kernels_lora_linear.test_fused_equals_reference_fp64(dropout, bias, monkeypatch)


def test_transposed_weight_in_every_order(variant, monkeypatch):
    test_kernels_lora_linear.test_gpt2_conv1d_transposed_weight(monkeypatch)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_mlp_down_op_in_every_order(variant, bias, transposed):
    test_blocks.test_op_gradcheck_float64(True, bias, transposed, "silu")


@pytest.mark.parametrize("bias", [False, True])
def test_shared_input_op_in_every_order(variant, bias, monkeypatch):
    test_blocks.test_shared_input_op_gradcheck_float64(bias, strided=False, monkeypatch=monkeypatch)


def test_shared_input_model_in_every_order(variant, monkeypatch):
    monkeypatch.setattr(blocks, "SHARED_QKV", True)
    test_blocks.test_shared_input_ops_match_the_per_layer_path(torch.float64, 1e-12, 1, False, monkeypatch, None)


def test_the_choice_is_measured_once_per_shape_and_kept(monkeypatch):
    measured = []
    monkeypatch.setattr(gemm_choice, "ENABLED", True)
    monkeypatch.setattr(gemm_choice, "chosen", {})
    monkeypatch.setattr(gemm_choice, "_can_measure", lambda device: True)
    monkeypatch.setattr(gemm_choice, "_fastest", lambda variants: measured.append(len(variants)) or 1)
    variants = (lambda: "default", lambda: "other")
    cpu = torch.device("cpu")
    assert gemm_choice.run("op", lambda: (1, 2), cpu, variants) == "other"
    assert gemm_choice.run("op", lambda: (1, 2), cpu, variants) == "other"
    assert measured == [2]  # once for this shape
    assert gemm_choice.run("op", lambda: (3, 4), cpu, variants) == "other" and measured == [2, 2]
    assert "op (1, 2): variant 1" in gemm_choice.report()


def test_nothing_is_measured_or_kept_where_it_cannot_be(monkeypatch):
    monkeypatch.setattr(gemm_choice, "ENABLED", True)
    monkeypatch.setattr(gemm_choice, "chosen", {})
    monkeypatch.setattr(gemm_choice, "_fastest", lambda variants: pytest.fail("measured"))
    variants = (lambda: "default", lambda: "other")
    assert gemm_choice.run("op", lambda: (1,), torch.device("cpu"), variants) == "default"  # CPU: the default
    assert gemm_choice.chosen == {}  # nothing kept: a later measurable call still measures
    monkeypatch.setattr(gemm_choice, "_can_measure", lambda device: True)
    gemm_choice.chosen[("op", (1,))] = 1
    monkeypatch.setattr(gemm_choice, "ENABLED", False)
    cuda = torch.device("cuda")
    assert gemm_choice.run("op", lambda: (1,), cuda, variants) == "default"  # switched off: the default,
    assert gemm_choice.run("op", lambda: (2,), cuda, variants) == "default"  # whatever was measured


def test_the_per_layer_op_asks_by_its_shape(monkeypatch):
    keys = []
    original = gemm_choice.run

    def recording(op, key, device, variants):
        keys.append((op, key()))
        return original(op, key, device, variants)

    monkeypatch.setattr(gemm_choice, "run", recording)
    x = torch.randn(3, 5, 16, requires_grad=True)
    W, A, B = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    lora_linear.lora_linear_fused(x, W, None, A, B, 0.5).sum().backward()
    assert keys == [("lora_forward", (15, 8, 16, 4, False, False, torch.float32)),
                    ("lora_grad_input", (15, 16, 8, 4, False, torch.float32))]
