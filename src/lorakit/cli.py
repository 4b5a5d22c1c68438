"""The `lorakit` command. Sub-commands are plain functions; argparse only wires flags to them.

    lorakit train    --model DIR --data FILE [--method lora|qlora|full] [--config run.toml] [flags]
    lorakit generate --model DIR [--adapter [NAME=]DIR ...] --prompt TEXT [--prompt ...]
    lorakit merge    --model DIR --adapter DIR --out DIR
    lorakit compare  (--model DIR | --model-config PRESET) [--data FILE] [--methods full,lora,qlora]
    lorakit demo     [NAME]

A user error (missing file, bad value, empty data, unknown column, ...) prints one line on stderr and exits
with status 2; a run that fails while training (a NaN loss) exits with 1. No traceback either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from collections.abc import Callable

from .errors import LoraError, TrainingError

EXIT_USAGE = 2
EXIT_FAILED = 1


# ------------------------------------------------------------------------------------------ demos
def _demo_quickstart(args: argparse.Namespace) -> int:
    from .demos import quickstart

    result = quickstart.run(steps=args.steps or 60, out_dir=args.out)
    ok = result["loss_after"] < result["loss_before"] and result["merge_max_abs_diff"] < 1e-4
    print("demo OK" if ok else "demo FAILED: loss did not fall or merge changed the outputs")
    return 0 if ok else 1


def _demo_job(name: str) -> Callable[[argparse.Namespace], int]:
    def job(args: argparse.Namespace) -> int:
        from .demos import run_demo

        return run_demo(name, steps=args.steps, out_dir=args.out)

    return job


DEMOS: dict[str, Callable[[argparse.Namespace], int]] = {
    "quickstart": _demo_quickstart, "digits": _demo_job("digits"), "text": _demo_job("text"),
    "causal": _demo_job("causal"), "all": _demo_job("all"),
    "personas": lambda args: __import__("lorakit.demos.personas", fromlist=["main"]).main(args),
}
"""Embedded default jobs: name -> function(args) -> exit code. Demos register here (args has .steps, .out)."""
DEFAULT_DEMO = "all"
"""What plain ``lorakit demo`` runs."""


def cmd_demo(args: argparse.Namespace) -> int:
    job = args.job or DEFAULT_DEMO
    if job not in DEMOS:
        raise _Usage(f"unknown demo {job!r}; demos: {', '.join(DEMOS)}")
    return DEMOS[job](args)


# ------------------------------------------------------------------------------------------ train
TRAIN_HOOKS: list = []
"""Loop hooks (see lorakit.train.loop) that ``lorakit train`` passes to every run: an extension point."""


def cmd_train(args: argparse.Namespace) -> int:
    from .train import distributed, run

    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and "WORLD_SIZE" not in os.environ:  # re-launch this command through torchrun
        argv = distributed.strip_flag(list(getattr(args, "argv", None) or sys.argv[1:]), "--nproc-per-node")
        return distributed.relaunch(nproc, argv)
    cfg = _train_config(args)
    try:
        summary = run(cfg, hooks=TRAIN_HOOKS)
    finally:
        gc.collect()  # a sharded model left in reference cycles would outlive its process group
        distributed.shutdown()
    if "rank" not in summary:  # ranks > 0 of a distributed run print nothing
        _print_train_summary(summary, cfg)
    return 0


def _train_config(args: argparse.Namespace, **forced):
    from .train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    overrides.update(forced)
    return TrainConfig.load(getattr(args, "config", None), overrides)


def _print_train_summary(s: dict, cfg) -> None:
    parts = [f"done: {s['steps']} steps", f"train loss {s['final_loss']:.4f}"]
    if s.get("final_eval_loss") is not None:
        parts.append(f"eval loss {s['final_eval_loss']:.4f}")
    if s.get("final_eval_ppl") is not None:
        parts.append(f"ppl {s['final_eval_ppl']:.2f}")
    if s.get("final_eval_accuracy") is not None:
        parts.append(f"accuracy {s['final_eval_accuracy']:.3f}")
    parts.append(f"{s['seconds_per_step']:.3f} s/step" if s.get("seconds_per_step") else "")
    print(", ".join(p for p in parts if p))
    print(
        f"saved: {s['saved_to']} ({s['saved_bytes'] / 1e6:.2f} MB); "
        f"metrics, config and summary in {cfg.output_dir}"
    )


# ------------------------------------------------------------------------------------------ generate
def cmd_generate(args: argparse.Namespace) -> int:
    from .train.generate import generate_command

    return generate_command(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from .train.export import merge_command

    return merge_command(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import compare_command

    return compare_command(args, _train_config)


# ------------------------------------------------------------------------------------------ parser
class _Usage(LoraError, ValueError):
    """A command-line mistake found after parsing."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lorakit train: error: argument --lr: invalid float value: 'x'``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


_GROUPS = {  # first field of each section of TrainConfig -> the --help heading
    "model": "what to train",
    "data": "data",
    "r": "the adapter",
    "lr": "optimisation",
    "device": "device and precision",
    "output_dir": "outputs, logging and checkpoints",
}
_METAVARS = {"model": "DIR", "tokenizer": "DIR", "data": "FILE", "eval_data": "FILE", "output_dir": "DIR",
             "model_config": "PRESET", "target_modules": "NAMES"}


def add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``lr`` -> ``--lr``), help text from the field's docstring, grouped
    like the dataclass.

    Defaults are left out of the namespace (SUPPRESS) so that a --config file is only overridden by flags
    actually given.
    """
    from .train import config as tc
    from .train.modeling import PRESETS

    choices = {"method": tc.METHODS, "task": tc.TASKS, "dtype": tc.DTYPES, "autocast": tc.AUTOCAST,
               "chat_loss": tc.CHAT_LOSS, "quant_type": tc.QUANT_TYPES, "model_config": tuple(PRESETS)}
    docs = tc.field_docs(tc.TrainConfig)
    parser.add_argument("--config", default=None, metavar="TOML",
                        help="read settings from a TOML file (flat key = value, names as below); flags override it")
    group = parser
    for f in dataclasses.fields(tc.TrainConfig):
        if f.name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[f.name])
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")
        if f.name == "resume":
            group.add_argument(flag, nargs="?", const="latest", default=argparse.SUPPRESS, metavar="CKPT",
                               help=help_text)
        elif f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            metavar = _METAVARS.get(f.name, {"int": "N", "float": "X", "str": "TEXT"}[f.type])
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices.get(f.name),
                               metavar=None if f.name in choices else metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from .train.config import QUANT_TYPES

    parser = _Parser(
        prog="lorakit",
        description="LoRA and QLoRA for PyTorch models: train, generate, merge, "
        "compare. Every sub-command has its own --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="fine-tune a Hugging Face model folder (LoRA, QLoRA or full)",
        description="Fine-tune a local Hugging Face model (causal LM or sequence classifier) "
        "and write the adapter, the resolved config, metrics.jsonl, loss.png and "
        "checkpoints into --output-dir. Settings: defaults < --config file < flags.",
    )
    add_train_flags(train)
    train.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="run on N local processes (GPUs) by re-launching this command through torchrun; "
                       "same as: torchrun --nproc-per-node N -m lorakit train ...")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser(
        "generate",
        help="generate text with the base model and/or adapters",
        description="Load the base model once, then generate for every prompt with each "
        "adapter in turn (switching adapters in place, no reload). Greedy by default.",
    )
    gen.add_argument("--model", required=True, help="Hugging Face causal-LM folder (the base model)")
    gen.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder; repeat for several (name defaults to the folder name)",
    )
    gen.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    gen.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    gen.add_argument("--base", action="store_true", help="also generate with the adapters disabled")
    gen.add_argument("--combine", action="store_true", help="also generate with all adapters active at once")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    gen.add_argument("--quantize", default="auto", choices=("auto", "none", *QUANT_TYPES),
                     help="store the base in 4 bits (nf4, fp4) or int8 while generating; auto: as the adapter "
                          "was trained (a lorakit train --method qlora adapter gets its quant type), else none")
    gen.add_argument("--json", action="store_true", help="print one JSON object per generation")
    gen.set_defaults(func=cmd_generate)

    merge = sub.add_parser(
        "merge",
        help="fold an adapter into the base and save a plain Hugging Face model",
        description="Write a Hugging Face model folder (safetensors) with the adapter folded "
        "into the weights; it loads with transformers alone.",
    )
    merge.add_argument("--model", required=True, help="the base model folder the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="adapter folder (lorakit or PEFT)")
    merge.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="saved weight dtype")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    merge.add_argument("--quantize", default="auto", choices=("auto", "none", *QUANT_TYPES),
                       help="fold the adapter into the dequantized 4/8-bit base (D(Q(W)) + BA: what a QLoRA "
                            "adapter was trained on); auto: as lorakit train trained it, else none (W + BA)")
    merge.set_defaults(func=cmd_merge)

    comp = sub.add_parser(
        "compare",
        help="full fine-tuning vs LoRA vs QLoRA on the same model, data, steps",
        description="Train each method for the same steps on the same data and print "
        "trainable parameters, time per step, peak memory, saved size and final eval "
        "numbers, plus compare.png. Each method runs in a fresh process (clean peaks).",
    )
    comp.add_argument(
        "--methods",
        default="full,lora,qlora",
        help="comma-separated: full, lora, qlora, peft-lora (default: full,lora,qlora)",
    )
    comp.add_argument("--steps", type=int, default=None, help="optimizer steps per method (= --max-steps)")
    comp.add_argument("--full-lr", type=float, default=None, help="learning rate for full (default: lr / 10)")
    comp.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each method in its own process (default) for clean memory peaks",
    )
    add_train_flags(comp, skip=("method", "resume"))
    comp.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="run an embedded default job (no downloads)")
    demo.add_argument(
        "job", nargs="?", default=None, help=f"one of: {', '.join(DEMOS)} (default: {DEFAULT_DEMO})"
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.add_argument("--out", default=None, help="directory to save the trained adapter into")
    demo.set_defaults(func=cmd_demo)

    from .serve.cli import add_serve_parser  # lorakit serve: flags and command live in lorakit.serve.cli

    add_serve_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """No hub access and no library chatter: lorakit reads local folders only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command != "demo":
        _quiet_libraries()
    if args.command in ("train", "compare", "demo"):
        from ._malloc import tune_for_training

        tune_for_training()  # large CPU tensors reused between steps instead of page-faulted in again
    try:
        return args.func(args)
    except TrainingError as err:
        _one_line(args, err)
        return EXIT_FAILED
    except _out_of_memory_types() as err:
        detail = " ".join(str(err).split())[:160]
        _one_line(args, f"out of memory ({detail}); lower --batch-size or --seq-len, or use "
                  "--gradient-checkpointing or --method qlora")
        return EXIT_FAILED
    except (LoraError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        _one_line(args, err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        resume = " (continue with --resume)" if args.command == "train" else ""
        print(f"lorakit {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    """MemoryError (CPU) and torch.OutOfMemoryError (CUDA, a RuntimeError), without importing torch."""
    torch = sys.modules.get("torch")
    return (MemoryError, torch.OutOfMemoryError) if torch is not None else (MemoryError,)


def _one_line(args: argparse.Namespace, err: BaseException) -> None:
    print(f"lorakit {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
