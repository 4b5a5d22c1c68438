"""The `digits` job: the LoRA tutorials' MNIST exercise on scikit-learn's bundled 8x8 handwritten digits.

The classic exercise (PyTorch LoRA tutorials): train a small network on all digits, find the digits it gets
wrong most often, then fine-tune a LoRA adapter on examples of those digits only. It shows what LoRA is
for: a small, separate, switchable update. The base weights never change, so switching the adapter off
gives the base model back bit for bit; and the exercise also shows the catch of tuning on a narrow slice
of data (the other digits can get worse the longer it runs).

The job runs the fine-tune twice from the same base model and the same seed: once with the wrapper
layers (``lorakit.inject``) and once with the weight parametrization (``lorakit.parametrize``), and prints
one table with both. Data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 digits, bundled with
scikit-learn; no download). About 2 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

import lorakit

from .._threads import one_thread
from .assets import require_module

METHODS = ("wrapper", "parametrize")
"""The two ways lorakit attaches an adapter: wrapper layers (``inject``) or a weight parametrization."""


@dataclass
class DigitsData:
    """The 8x8 digits as float pixels in [0, 1] (64 per image), split into train and test with a fixed seed."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Evaluation:
    """Test-set quality of one model state: overall accuracy and the number of wrong answers per digit."""

    accuracy: float
    errors: list[int]
    counts: list[int]
    logits: torch.Tensor = field(repr=False)

    def errors_on(self, digits: list[int]) -> int:
        return sum(self.errors[d] for d in digits)

    def accuracy_on(self, digits: list[int]) -> float:
        total = sum(self.counts[d] for d in digits)
        return 1.0 - self.errors_on(digits) / total if total else float("nan")


@dataclass
class MethodResult:
    """One fine-tune (wrapper or parametrize): quality after it and with the adapter switched off."""

    method: str
    summary: lorakit.Summary
    after: Evaluation
    disabled: Evaluation
    disabled_identical: bool
    seconds: float
    longer: Evaluation | None = None
    longer_steps: int = 0


class MLP(nn.Module):
    """64 pixels -> hidden -> hidden -> 10 digits, ReLU. Named layers so LoRA targets read well."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_data(seed: int = 0, test_fraction: float = 0.5) -> DigitsData:
    """scikit-learn's digits, stratified split (half for testing gives ~90 test images per digit)."""
    require_module("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsData(x_tr, y_tr, x_te, y_te)


@torch.no_grad()
def evaluate(model: nn.Module, data: DigitsData) -> Evaluation:
    """Accuracy and per-digit error counts on the test split (eval mode, one batch)."""
    model.eval()
    logits = model(data.x_test)
    pred = logits.argmax(-1)
    wrong = pred != data.y_test
    errors = [int((wrong & (data.y_test == d)).sum()) for d in range(10)]
    counts = [int((data.y_test == d).sum()) for d in range(10)]
    return Evaluation(float((~wrong).float().mean()), errors, counts, logits)


def train_base(data: DigitsData, epochs: int = 2, hidden: int = 256, lr: float = 1e-3, batch_size: int = 32,
               seed: int = 0) -> MLP:
    """Train the base MLP on all digits. Two epochs only (the tutorial trains one), so weak digits remain."""
    torch.manual_seed(seed)
    model = MLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def worst_digits(evaluation: Evaluation, k: int) -> list[int]:
    """The k digits with the most test errors (ties: the smaller digit first), sorted."""
    ranked = sorted(range(10), key=lambda d: (-evaluation.errors[d], d))
    return sorted(ranked[:k])


def attach(model: nn.Module, method: str, config: lorakit.LoraConfig) -> lorakit.Summary:
    """Add the adapter with the chosen method; returns the trainable-parameter summary."""
    if method == "wrapper":
        return lorakit.inject(model, config)
    if method == "parametrize":
        return lorakit.parametrize(model, config)
    raise lorakit.ConfigError(f"digits demo: method must be one of {METHODS}, got {method!r}")


def adapter_off(model: nn.Module, method: str):
    """Context manager under which the model computes as its base (the adapter switched off)."""
    return lorakit.disable_adapters(model) if method == "wrapper" else lorakit.disable_parametrized(model)


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int,
             gen: torch.Generator) -> None:
    """Adam on the trainable parameters only (the adapter), random batches drawn from (x, y)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def adapter_state(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (the same keys for both methods), cloned."""
    state = lorakit.adapter_state_dict(model) if method == "wrapper" else lorakit.parametrized_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model: nn.Module, method: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed tensors into the model's adapter (so both methods can start from the same A)."""
    if method == "parametrize":
        lorakit.load_parametrized_state(model, tensors)
        return
    for path, layer in lorakit.lora_layers(model):
        local = {k: tensors[f"base_model.model.{path}.{k}"] for k in layer.peft_state("default")}
        layer.load_peft_state("default", local)


def run_method(base: nn.Module, before: Evaluation, data: DigitsData, digits: list[int], method: str,
               config: lorakit.LoraConfig, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
               longer_steps: int = 0, init: dict[str, torch.Tensor] | None = None) -> tuple[MethodResult, dict]:
    """Fine-tune a copy of ``base`` on the chosen digits with one method; the base itself is not touched.

    ``init``: the adapter tensors to start from (another method's initial state), or None to use this
    method's own random A. Returns the result and the initial adapter state it started from.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    summary = attach(model, method, config)
    if init is not None:
        load_adapter_state(model, method, init)
    start = adapter_state(model, method)
    mask = torch.isin(data.y_train, torch.tensor(digits))
    x, y = data.x_train[mask], data.y_train[mask]
    gen = torch.Generator().manual_seed(seed + 2)  # the same batches for every method
    t0 = time.perf_counter()
    finetune(model, x, y, steps, lr, batch_size, gen)
    seconds = time.perf_counter() - t0
    after = evaluate(model, data)
    with adapter_off(model, method):
        disabled = evaluate(model, data)
    identical = torch.equal(disabled.logits, before.logits)
    longer = None
    if longer_steps > steps:
        finetune(model, x, y, longer_steps - steps, lr, batch_size, gen)
        longer = evaluate(model, data)
    return MethodResult(method, summary, after, disabled, identical, seconds, longer, longer_steps), start


def run(steps: int = 20, worst: int = 2, rank: int = 4, lr: float = 5e-4, base_epochs: int = 2, hidden: int = 256,
        seed: int = 0, methods: tuple[str, ...] = METHODS, longer_steps: int = 80, verbose: bool = True) -> dict:
    """The whole job; prints a report when ``verbose`` and returns every number in a dict.

    Args:
        steps: LoRA fine-tuning steps (batches of 32 images of the worst digits).
        worst: how many of the worst digits to fine-tune on (the tutorial uses 1; 1 to 3 make sense).
        rank: LoRA rank on fc1, fc2 and out (alpha = rank, so the scale is 1).
        lr: Adam learning rate of the fine-tune. With 20 steps the worst digits improve and the others hold;
            far more steps on only those digits make the model forget the others (``longer_steps`` shows it).
        base_epochs: epochs of base training on all digits.
        hidden: MLP width.
        seed: seeds the split, the base model, the adapter initialisation and the batches.
        methods: which of ``METHODS`` to run.
        longer_steps: after the main numbers, continue the fine-tune to this many steps to show forgetting
            (0 to skip).
        verbose: print the report.
    """
    if not 1 <= worst <= 9:
        raise lorakit.ConfigError(f"digits demo: worst must be between 1 and 9, got {worst}")
    if steps < 1:
        raise lorakit.ConfigError(f"digits demo: steps must be >= 1, got {steps}")
    with one_thread():
        return _run(steps, worst, rank, lr, base_epochs, hidden, seed, methods, longer_steps, verbose)


def _run(steps: int, worst: int, rank: int, lr: float, base_epochs: int, hidden: int, seed: int,
         methods: tuple[str, ...], longer_steps: int, verbose: bool) -> dict:
    t_start = time.perf_counter()
    data = load_data(seed)
    t0 = time.perf_counter()
    base = train_base(data, base_epochs, hidden, seed=seed)
    base_seconds = time.perf_counter() - t0
    before = evaluate(base, data)
    digits = worst_digits(before, worst)
    config = lorakit.LoraConfig(r=rank, alpha=float(rank), target_modules=["fc1", "fc2", "out"])
    results, init = [], None
    for method in methods:  # every method starts from the first one's A, so their numbers are comparable
        result, start = run_method(base, before, data, digits, method, config, steps, lr, seed=seed,
                                   longer_steps=longer_steps if not results else 0, init=init)
        results.append(result)
        init = init if init is not None else start
    report = {
        "digits": digits, "steps": steps, "base_seconds": base_seconds, "before": before, "methods": results,
        "train_size": len(data.y_train), "test_size": len(data.y_test),
        "finetune_size": int(torch.isin(data.y_train, torch.tensor(digits)).sum()),
        "seconds": time.perf_counter() - t_start,
    }
    if verbose:
        print(format_report(report, rank=rank, lr=lr, base_epochs=base_epochs, hidden=hidden))
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_report(report: dict, rank: int, lr: float, base_epochs: int, hidden: int) -> str:
    """The printed report: set-up, one per-digit table for every model state, the checks, the timings."""
    before: Evaluation = report["before"]
    results: list[MethodResult] = report["methods"]
    digits = report["digits"]
    shown = ", ".join(str(d) for d in digits)
    lines = [
        (f"digits: scikit-learn's 8x8 handwritten digits, {report['train_size']} train / "
         f"{report['test_size']} test images"),
        (f"base: MLP 64-{hidden}-{hidden}-10 trained on all digits for {base_epochs} epochs "
         f"({report['base_seconds']:.1f} s)"),
        (f"worst digits of the base model: {shown} -> LoRA fine-tune on those digits only "
         f"({report['finetune_size']} train images), {report['steps']} steps of 32, Adam lr {lr:g}"),
        "",
    ]
    for r in results:
        s = r.summary
        lines.append(f"  {r.method:<11} r={rank} on fc1, fc2, out: trainable {s.trainable:,} of {s.total:,} "
                     f"parameters ({s.percent:.2f}%), fine-tune {r.seconds:.2f} s")
    lines.append("")

    columns = [("before", before)]
    for r in results:
        columns += [(f"{r.method}", r.after), ("off", r.disabled)]
    widths = [max(8, len(name) + 3) for name, _ in columns]

    def row(label: str, cells: list[str]) -> str:
        return label + " |" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))

    header = row("digit  test", [name for name, _ in columns])
    lines += [("wrong answers per digit on the test set, before and after fine-tuning, and with the adapter "
               "switched off:"), header, "-" * len(header)]
    for d in range(10):
        mark = "*" if d in digits else " "
        lines.append(row(f"{d:>4}{mark} {before.counts[d]:>5}", [str(e.errors[d]) for _, e in columns]))
    lines.append("-" * len(header))
    lines.append(row(f"{'worst':>5} {sum(before.counts[d] for d in digits):>5}",
                     [str(e.errors_on(digits)) for _, e in columns]))
    lines.append(row(f"{'accuracy':>11}", [_pct(e.accuracy) for _, e in columns]))
    lines.append(f"(* = fine-tuned digit; 'worst' row = errors on digits {shown})")
    lines.append("")
    for r in results:
        verdict = "identical to the base model, bit for bit" if r.disabled_identical else "DIFFERENT from the base"
        lines.append(f"{r.method}: errors on digits {shown}: {before.errors_on(digits)} -> {r.after.errors_on(digits)}; "
                     f"accuracy {_pct(before.accuracy)} -> {_pct(r.after.accuracy)}; adapter off: logits {verdict}")
    if len(results) == 2:
        a, b = results
        same = a.after.errors == b.after.errors
        diff = (a.after.logits - b.after.logits).abs().max().item()
        lines.append(f"wrapper vs parametrize after fine-tuning: max |logit difference| {diff:.1e}"
                     f"{' (same per-digit errors)' if same else ''}")
    longer = [r for r in results if r.longer is not None]
    if longer:
        r = longer[0]
        lines += ["", (f"the catch: fine-tuning on digits {shown} only, for {r.longer_steps} steps instead of "
                       f"{report['steps']}, errors on them: {r.longer.errors_on(digits)}, but accuracy over all "
                       f"digits: {_pct(r.longer.accuracy)}"),
                  "(the model forgets the other digits; the adapter can be switched off, or a mixed data set used)"]
    lines.append(f"total {report['seconds']:.1f} s")
    return "\n".join(lines)
