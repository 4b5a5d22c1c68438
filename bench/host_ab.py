"""Host-side code of two lorakit versions in ONE process: this tree's fused-path functions against another
checkout's, with a frozen floor model alongside, in interleaved rounds.

Why: a change to the Python that runs around the kernels (operand checks, the widened weights, the shared-input
op's setup) moves a step by well under 1%, less than two runs of a bench in separate processes differ by
(docs/speed.md, session 28). Here both versions time the same model in the same process.

How: the functions named in PATCH are read from ``--old``'s sources and compiled into the live modules'
namespaces (so every other name resolves to this tree's objects); ``install`` swaps them in and out. Both versions
must compute the same values: one step's loss is printed for each.

    python bench/host_ab.py --old /path/to/other/checkout [--shape llama-1b --batch 4 --seq 2048]
    python bench/host_ab.py --old ../old --shape llama-8b --batch 2 --grad-ckpt
    python bench/host_ab.py --old ../old --device cpu --tiny     # host time alone (tiny widths, 16 layers)
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import statistics

import torch
from common import build_llama
from train_gpu import TARGETS, build_for_training, measure

import lorakit as lk
from lorakit import blocks, widen
from lorakit.kernels import shared_input
from lorakit.layers import linear

PATCH = [  # (live module, source file under src/lorakit, class or None, function names)
    (linear, "layers/linear.py", "Linear", ["fused_call", "_fused_adapter", "_base_operand"]),
    (widen, "widen.py", "Widened", ["holds", "buffer"]),
    (shared_input, "kernels/shared_input.py", "LoraSharedInputFunction", ["forward"]),
    (shared_input, "kernels/shared_input.py", None, ["lora_shared_input"]),
    (blocks, "blocks.py", None, ["shared_outputs", "_has_hooks"]),
]


def load_versions(old_root: pathlib.Path) -> dict[str, dict]:
    """{"new": {(owner, name): object}, "old": {...}} for every function in PATCH."""
    versions: dict[str, dict] = {"new": {}, "old": {}}
    for module, path, cls, names in PATCH:
        source = old_root / "src" / "lorakit" / path
        tree = ast.parse(source.read_text())
        body = tree.body if cls is None else next(
            n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
        owner = module if cls is None else getattr(module, cls)
        for name in names:
            node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
            node.decorator_list = []
            namespace = module.__dict__  # the live globals: the old function sees whatever is installed
            current = namespace.get(name)
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), namespace)  # noqa: S102
            old = namespace.pop(name)
            if current is not None:
                namespace[name] = current
            versions["new"][(owner, name)] = owner.__dict__[name] if cls is not None else getattr(module, name)
            versions["old"][(owner, name)] = staticmethod(old) if static else old
    return versions


def install(versions: dict[str, dict], which: str) -> None:
    for (owner, name), obj in versions[which].items():
        setattr(owner, name, obj)
    blocks.lora_shared_input = shared_input.lora_shared_input  # blocks imported it by name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, type=pathlib.Path, help="the other checkout (its src/lorakit is read)")
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 16-layer Llama of hidden size 32, 8 tokens: host time alone")
    args = p.parse_args()
    versions = load_versions(args.old)
    device = args.device

    def build():
        if args.tiny:
            shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 16, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": 64, "head_dim": 16}
            model = build_llama(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
            model.config.use_cache = False
            return model
        return build_for_training(args.shape, device, args.grad_ckpt)

    if device == "cpu":
        torch.set_num_threads(1)
    floor_model = build().requires_grad_(False)
    floor_model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    model = build()
    batch_shape = (1, 8) if args.tiny else (args.batch, args.seq)
    batch = torch.randint(0, model.config.vocab_size, batch_shape, device=device)
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def floor_step():
        floor_model(input_ids=batch, labels=batch).loss.backward()

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for which in ("new", "old"):
        install(versions, which)
        print(f"one step's loss, {which}: {model(input_ids=batch, labels=batch).loss.item():.6f}")
    times: dict[str, list[float]] = {"floor": [], "new": [], "old": []}
    for r in range(args.rounds):
        times["floor"].append(measure(floor_model, floor_step, batch, args.steps, args.warmup, device)["tok_s"])
        for which in ("new", "old") if r % 2 == 0 else ("old", "new"):
            install(versions, which)
            times[which].append(measure(model, step, batch, args.steps, args.warmup, device)["tok_s"])
    install(versions, "new")
    floor = statistics.median(times["floor"])
    what = "tiny Llama (16 layers, hidden 32, 8 tokens)" if args.tiny else \
        f"{args.shape} batch {args.batch} x {args.seq} grad ckpt {args.grad_ckpt}"
    print(f"{what}, {device}, torch {torch.__version__}; tokens/s, median of {args.rounds} rounds (each round's)")
    for which, t in times.items():
        med = statistics.median(t)
        print(f"  {which:>5}: {med:10.1f} = {med / floor:.3f} of the floor  ({' '.join(f'{x:.1f}' for x in t)})")


if __name__ == "__main__":
    main()
