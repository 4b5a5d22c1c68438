"""Which kernels a step with graphed decoder layers runs, against the eager step: GPU time per kernel name and
the largest differences (8B shape cut to 4 layers, batch 2 x 2048; the frozen floor, or LoRA with --lora).

It found the first graph_layers' checkpointed backward redoing one frozen GEMM a layer (docs/speed.md, "Decoder layers
as CUDA graphs"; bench/results/2026-12-02_h200_s17_graphed_kernels.txt).

    python bench/graph_kernels.py --ckpt [--lora]
"""
import sys

import torch
from common import build_llama
from train_gpu import SHAPES, TARGETS, profile

import lorakit as lk

ckpt = "--ckpt" in sys.argv
lora = "--lora" in sys.argv
shape = dict(SHAPES["llama-8b"], num_hidden_layers=4)
model = build_llama(shape, "cuda")
model.config.use_cache = False
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
if lora:
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
else:
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
batch = torch.randint(0, 1000, (2, 2048), device="cuda")

def step():
    model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)

def table(tag):
    for _ in range(3):  # graphed: two eager calls per layer, then the capture
        step()
    return {k: t for k, (t, n) in profile(step, tag).items()}  # train_gpu's per-kernel profile, ms


e = table(f"eager ckpt={ckpt} lora={lora}")
lk.graph_layers(model)
g = table(f"graphed ckpt={ckpt} lora={lora}")
print(f"replays {lk.graphed_replays(model)}")
diff = sorted(set(e) | set(g), key=lambda k: abs(g.get(k, 0) - e.get(k, 0)), reverse=True)[:12]
print("largest differences (graphed - eager, ms):")
for k in diff:
    print(f"  {g.get(k, 0) - e.get(k, 0):+8.2f}  {k[:110]}")
