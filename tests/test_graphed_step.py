"""GraphedTrainStep (train/graphed_step.py): clear errors everywhere; on a GPU, a replayed CUDA-graph step
trains exactly as the same step run eagerly."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.train.graphed_step import GraphedTrainStep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(dropout=0.0):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.config.use_cache = False
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules=TARGETS, dropout=dropout))
    with torch.no_grad():  # B = 0 would make the first steps' A gradients zero: start from a non-trivial adapter
        for _, layer in lk.lora_layers(model):
            for name in layer.specs:
                layer.lora_B[name].weight.normal_(std=0.02)
    return model


def loss_of(model):
    return lambda b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


def batches(n, shape=(2, 32), seed=3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, shape, device="cuda", generator=gen)} for _ in range(n)]


def test_needs_cuda_or_says_so():
    if torch.cuda.is_available():
        pytest.skip("the no-GPU message is only reachable without a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GraphedTrainStep(lambda b: b["x"].sum(), None)


@cuda
def test_graphed_steps_equal_eager_steps():
    eager_model = tiny_lora_llama()
    graph_model = copy.deepcopy(eager_model)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]
    eager_opt = torch.optim.AdamW(params(eager_model), lr=1e-3, fused=True, capturable=True)
    graph_opt = torch.optim.AdamW(params(graph_model), lr=1e-3, fused=True, capturable=True)
    step = GraphedTrainStep(loss_of(graph_model), graph_opt, warmup=2, clip_grad_norm=1.0,
                            params=params(graph_model))
    eager_losses, graph_losses = [], []
    for batch in batches(8):
        eager_opt.zero_grad(set_to_none=True)
        loss = loss_of(eager_model)(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params(eager_model), 1.0, foreach=True)
        eager_opt.step()
        eager_losses.append(loss.item())
        graph_losses.append(step(batch).item())
    assert step.graph is not None  # steps 3..8 were replays
    # same kernels in the same order: bit-equal is expected, bf16 rounding noise is the stated tolerance
    assert max(abs(a - b) for a, b in zip(eager_losses, graph_losses)) < 1e-2, (eager_losses, graph_losses)
    assert graph_losses[-1] < graph_losses[0]
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=0.02, atol=1e-3, msg=name)


@cuda
def test_rejects_other_shapes_and_non_capturable_optimizers():
    model = tiny_lora_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(loss_of(model), torch.optim.AdamW(trainable, fused=True))
    step = GraphedTrainStep(loss_of(model), torch.optim.AdamW(trainable, fused=True, capturable=True), warmup=1)
    for batch in batches(2):
        step(batch)
    with pytest.raises(ValueError, match="fixed shapes"):
        step(batches(1, shape=(2, 16))[0])
    with pytest.raises(ValueError, match="batch keys"):
        step({"ids": batches(1)[0]["input_ids"]})
