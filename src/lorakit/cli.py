"""The `lorakit` command. Sub-commands are plain functions; argparse only wires flags to them."""

from __future__ import annotations

import argparse
import sys


def cmd_demo(args: argparse.Namespace) -> int:
    if args.job == "quickstart":
        from .demos import quickstart

        result = quickstart.run(steps=args.steps, out_dir=args.out)
        ok = result["loss_after"] < result["loss_before"] and result["merge_max_abs_diff"] < 1e-4
        print("demo OK" if ok else "demo FAILED: loss did not fall or merge changed the outputs")
        return 0 if ok else 1
    raise SystemExit(f"unknown demo {args.job!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run an embedded default job (no downloads)")
    demo.add_argument("job", nargs="?", default="quickstart", choices=["quickstart"])
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    demo.add_argument("--out", default=None, help="directory to save the trained adapter into")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
