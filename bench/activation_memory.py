"""What one training step stores for backward, counted exactly on any machine: the floor and lorakit.

A LoRA step's peak memory is the weights, the adapters and their optimizer state, plus the tensors autograd
saves between forward and backward (the activations), plus short-lived buffers. The activations are the
part LoRA can change. This script counts them (lorakit.activation_memory: a saved-tensors hook, distinct
storages, weights excluded) while the model runs under FakeTensorMode: shapes and dtypes without memory or compute, so the
Llama-3.2-1B shape at 4 x 2048 tokens is counted in seconds on a laptop CPU. (Attention saves what the CPU's
SDPA kernel saves; every row runs the same attention, so the differences between rows are exact.) PEFT cannot
be built on fake parameters (its ``.to()`` of each adapter must swap them); on real tensors it stores what
lorakit's unfused path stores or more (tests/test_blocks.py counts both).

    python bench/activation_memory.py --shape llama-1b --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from common import build_llama
from torch._subclasses.fake_tensor import FakeTensorMode
from train_gpu import SHAPES, TARGETS

from lorakit.activation_memory import saved_bytes

warnings.filterwarnings("ignore")


def saved_gib(model, ids) -> float:
    return saved_bytes(model, lambda: model(input_ids=ids, labels=ids)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()

    import transformers

    import lorakit as lk

    rows = {}
    # everything fake, weights included: no memory, and a weight's storage is the same object in every use
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_llama(SHAPES[args.shape], "cpu")
        model.config.use_cache = False
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
        model.requires_grad_(False)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        rows["frozen base fwd+bwd (floor)"] = saved_gib(model, ids)
        hook.remove()
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
        rows["lorakit (fused MLP block)"] = saved_gib(model, ids)
        lk.blocks.unfuse(model)
        rows["lorakit, MLP block not fused"] = saved_gib(model, ids)

    floor = rows["frozen base fwd+bwd (floor)"]
    print(f"{args.shape} shape, bf16, batch {args.batch} x {args.seq}, r=16 on {TARGETS}, no checkpointing; "
          f"activations saved for backward (FakeTensorMode, CPU SDPA); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"{' '.join(sys.argv[1:]) or 'defaults'}")
    print(f"| {'setup':<32} | {'saved GiB':>9} | {'- floor GiB':>11} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 13}|")
    for label, gib in rows.items():
        print(f"| {label:<32} | {gib:>9.2f} | {gib - floor:>+11.2f} |")


if __name__ == "__main__":
    main()
