"""The quick-start job: LoRA on a small GPT-2 built from a config, end to end in ~20 s on 2 CPU cores.

It saves the random base model to a temp dir and loads it back (the real loading path), injects LoRA,
trains on the Zen of Python (real English that ships with every Python), and checks that the merged
model computes what the unmerged one does.
"""

from __future__ import annotations

import codecs
import tempfile
import time

import torch


def zen_of_python() -> str:
    import this

    return codecs.decode(this.s, "rot13")


def run(steps: int = 60, seed: int = 0, out_dir: str | None = None) -> dict:
    import contextlib
    import io as _io

    from transformers import GPT2Config, GPT2LMHeadModel

    import lorakit

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(_io.StringIO()):
        text = zen_of_python()
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(config).save_pretrained(tmp)
        model = GPT2LMHeadModel.from_pretrained(tmp)

    lora = lorakit.LoraConfig(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    info = lorakit.inject(model, lora)
    print(f"model: GPT-2 shape from a config, {info.total:,} parameters, LoRA r=8 on c_attn, c_proj, c_fc")
    print(info)

    block = 64
    gen = torch.Generator().manual_seed(seed)
    eval_starts = torch.arange(0, len(data) - block - 1, block)

    def batch(starts):
        x = torch.stack([data[s:s + block] for s in starts])
        return x, torch.stack([data[s + 1:s + block + 1] for s in starts])

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            x, y = batch(eval_starts)
            return model(input_ids=x, labels=y).loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (16,), generator=gen)
        x, y = batch(starts)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    after = eval_loss()
    print(f"eval loss: {before:.3f} before -> {after:.3f} after {steps} steps ({seconds:.1f} s)")

    x, _ = batch(eval_starts[:4])
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        lorakit.merge(model)
        merged = model(input_ids=x).logits
        lorakit.unmerge(model)
    diff = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged logits: max abs difference {diff:.2e} (fp32)")
    result = {"trainable": info.trainable, "total": info.total, "loss_before": before, "loss_after": after,
              "merge_max_abs_diff": diff, "seconds": seconds}
    if out_dir is not None:
        lorakit.save_adapter(model, out_dir)
        print(f"adapter saved to {out_dir} (PEFT format: adapter_config.json + adapter_model.safetensors)")
    return result
