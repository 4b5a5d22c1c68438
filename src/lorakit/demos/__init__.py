"""Embedded default jobs: they need nothing but the installed packages (no downloads).

    digits      LoRA on an MLP for scikit-learn's 8x8 digits (the tutorials' MNIST exercise), ~5 s
    text        LoRA on a pretrained MiniLM (BERT) for tweet sentiment, with full fine-tuning beside it, ~2 min
    causal      LoRA on SmolLM2-135M-Instruct over the King James Bible, ~1.5 min (+20 s the first time)
    quickstart  LoRA on a small random GPT-2, ~20 s

``run_demo(name, steps)`` runs one and returns an exit code: 0 when the run shows what it is meant to show
(the fine-tune helps and switching the adapter off restores the base exactly), 1 otherwise.
"""

from __future__ import annotations

JOBS = ("digits", "text", "causal")
"""The jobs ``run_demo`` knows (quickstart has its own entry in the CLI)."""


def run_demo(name: str, steps: int | None = None, out_dir: str | None = None) -> int:
    """Run demo ``name`` ("digits", "text", "causal", or "all" = digits then text) with its defaults.

    Args:
        name: which job.
        steps: fine-tuning steps instead of the job's default (None: the default).
        out_dir: where text and causal save their trained adapter (PEFT format); digits saves none.
    """
    from ..errors import ConfigError

    kwargs = {} if steps is None else {"steps": steps}
    if out_dir is not None:
        if name not in ("text", "causal"):
            raise ConfigError(f"demo {name!r} saves no adapter; --out works with the text and causal demos")
        kwargs["out_dir"] = out_dir
    if name == "all":
        codes = [run_demo("digits", steps)]
        print()
        codes.append(run_demo("text", steps))
        return max(codes)
    if name == "digits":
        from . import digits

        r = digits.run(**kwargs)
        ok = all(m.after.errors_on(r["digits"]) < r["before"].errors_on(r["digits"]) and m.disabled_identical
                 for m in r["methods"])
        return _verdict(ok, "the worst digits did not improve or switching the adapter off changed the outputs")
    if name == "text":
        from . import text

        r = text.run(**kwargs)
        ok = r["adapter_off_identical"] and r["arms"][0].report.accuracy > r["before"].accuracy
        return _verdict(ok, "accuracy did not rise or switching the adapter off changed the outputs")
    if name == "causal":
        from . import causal

        r = causal.run(**kwargs)
        ok = r["adapter_off_identical"] and r["loss_after"] < r["loss_before"]
        return _verdict(ok, "the held-out loss did not fall or switching the adapter off changed the outputs")
    raise ConfigError(f"unknown demo {name!r}; demos: {', '.join(JOBS)}, all")


def _verdict(ok: bool, failure: str) -> int:
    print("demo OK" if ok else f"demo FAILED: {failure}")
    return 0 if ok else 1
