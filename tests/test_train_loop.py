"""lorakit.train.loop / run / checkpoint: the loop on tiny models built from configs (CPU, fp32).

Resume is checked bit for bit: a run killed by a hook and resumed from its checkpoint writes exactly the
losses of an uninterrupted run, dropout included (RNG state is part of the checkpoint).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch
from helpers_train import make_causal_lm, make_classifier, sentiment_records, text_records, write_jsonl
from safetensors.torch import load_file

from lorakit.errors import ConfigError, TrainingError
from lorakit.train import TrainConfig, report, run
from lorakit.train.loop import lr_at
from lorakit.train.modeling import qlora_available

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_causal_lm(root / "model")
    return root / "model", write_jsonl(root / "d.jsonl", text_records(48))


def config(llama, out, **kw) -> TrainConfig:
    model, data = llama
    base = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(out),
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 10,
        "lr": 5e-3,
        "progress": False,
        "plot": False,
        "save_every": 0,
    }
    return TrainConfig(**(base | kw))


def losses(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("grad_norm")) for r in records]


class KillAt:
    """A hook that stops training after ``step`` like a kill would (no clean-up runs after it)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, record):
        if state.step == self.step:
            raise KeyboardInterrupt(f"simulated kill at step {self.step}")


def quiet(_line: str) -> None:
    pass


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 10, 1.0, 2, 0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))
    assert lr_at(10, 10, 1.0, 2, 0.1) == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_loss_falls_and_files_are_written(llama, tmp_path):
    summary = run(
        config(llama, tmp_path, max_steps=30, eval_every=5, plot=True, lr=1e-2, batch_size=8), log=quiet
    )
    records = losses(tmp_path)
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(train) == 30 and len(evals) == 6
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.3
    assert evals[-1] < evals[0] - 0.15
    assert summary["final_eval_ppl"] == pytest.approx(math.exp(summary["final_eval_loss"]))
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/lorakit_train.json",
        "train_config.toml",
        "summary.json",
        "metrics.jsonl",
        "checkpoints/step-000030/state.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainConfig.load(tmp_path / "train_config.toml").lr == 1e-2


def test_resume_after_kill_gives_the_same_loss_curve(llama, tmp_path):
    settings = {
        "max_steps": 10,
        "grad_accum": 2,
        "dropout": 0.1,
        "save_every": 3,
        "eval_every": 5,
    }  # crosses an epoch
    full = tmp_path / "full"
    run(config(llama, full, **settings), log=quiet)

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(config(llama, killed, **settings), hooks=[KillAt(7)], log=quiet)
    assert [r["step"] for r in losses(killed) if "loss" in r] == list(range(1, 8))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000003", "step-000006"]

    with pytest.raises(ConfigError, match="unfinished run; continue it with --resume"):
        run(config(llama, killed, **settings), log=quiet)  # a fresh start would bury the checkpoints
    summary = run(config(llama, killed, resume="latest", **settings), log=quiet)
    assert summary["resumed_from"].endswith("step-000006")
    assert curve(losses(killed)) == curve(losses(full))  # exactly equal, fp32 on CPU
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="different run.*lr"):
        run(config(llama, killed, resume="latest", **(settings | {"lr": 1e-3})), log=quiet)


def test_gradient_accumulation_equals_the_big_batch(llama, tmp_path):
    # on the CPU in fp32 (a GPU would autocast to bf16, whose rounding differs between the two splittings)
    big = run(config(llama, tmp_path / "big", max_steps=3, batch_size=4, grad_accum=1, device="cpu"), log=quiet)
    small = run(config(llama, tmp_path / "small", max_steps=3, batch_size=2, grad_accum=2, device="cpu"), log=quiet)
    assert [r["loss"] for r in losses(tmp_path / "small") if "loss" in r] == pytest.approx(
        [r["loss"] for r in losses(tmp_path / "big") if "loss" in r], abs=1e-6
    )
    a = load_file(tmp_path / "big" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "small" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # Adam amplifies fp32 rounding
    assert big["tokens"] == small["tokens"]


def test_gradient_checkpointing_gives_the_same_losses(llama, tmp_path):
    run(config(llama, tmp_path / "a", max_steps=3), log=quiet)
    run(config(llama, tmp_path / "b", max_steps=3, gradient_checkpointing=True), log=quiet)
    la = [r["loss"] for r in losses(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in losses(tmp_path / "b") if "loss" in r]
    assert lb == pytest.approx(la, abs=1e-6)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(llama, tmp_path):
    class Poison:
        def on_step_end(self, state, record):
            if state.step == 2:
                weight = next(p for n, p in state.model.named_parameters() if "lora_B" in n)
                with torch.no_grad():
                    weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"the loss became nan at step 3 .*Try: lower --lr"):
        run(config(llama, tmp_path, save_every=1), hooks=[Poison()], log=quiet)
    assert [r["step"] for r in losses(tmp_path)] == [1, 2]
    assert (tmp_path / "checkpoints" / "step-000002" / "state.json").is_file()
    assert (
        not load_file(tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors")[
            next(
                k
                for k in load_file(tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors")
                if "lora_B" in k
            )
        ]
        .isnan()
        .any()
    )


def test_classifier_learns_and_reports_accuracy(tmp_path):
    make_classifier(tmp_path / "bert")
    data = write_jsonl(tmp_path / "s.jsonl", sentiment_records(120))
    cfg = TrainConfig(
        model=str(tmp_path / "bert"),
        data=str(data),
        output_dir=str(tmp_path / "out"),
        seq_len=16,
        batch_size=8,
        max_steps=80,
        lr=5e-3,
        eval_fraction=0.25,
        eval_every=80,
        progress=False,
        plot=False,
        save_every=0,
    )
    summary = run(cfg, log=quiet)
    assert summary["task"] == "classification"
    assert summary["final_eval_accuracy"] >= 0.9
    info = json.loads((tmp_path / "out" / "adapter" / "lorakit_train.json").read_text())
    assert info["label_names"] == ["0", "1"]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"


def test_full_fine_tuning_saves_a_plain_model(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = run(config(llama, tmp_path, max_steps=3, method="full"), log=quiet)
    assert summary["trainable_params"] == summary["total_params"]
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(llama[0])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], base.state_dict()[name])
    # the checkpoint holds every weight plus two AdamW moments for each
    assert summary["checkpoint_bytes"] == 3 * 4 * summary["total_params"] + 4 * len(list(tuned.parameters()))


def test_checkpoints_are_pruned_and_no_temp_left(llama, tmp_path):
    run(config(llama, tmp_path, max_steps=8, save_every=2, keep_checkpoints=2), log=quiet)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert not [p for p in tmp_path.rglob(".*")]


def test_plot_is_skipped_with_a_note_without_matplotlib(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    summary = run(config(llama, tmp_path, max_steps=2, plot=True), log=quiet)
    assert "matplotlib is not installed" in summary["plot"]
    assert not (tmp_path / "loss.png").exists()


def test_bf16_autocast_runs_on_cpu(llama, tmp_path):
    summary = run(config(llama, tmp_path, max_steps=2, autocast="bf16"), log=quiet)
    assert summary["autocast"] == "bf16" and math.isfinite(summary["final_loss"])


def test_synthetic_data_for_presets(tmp_path):
    cfg = TrainConfig(
        model_config="llama-tiny",
        output_dir=str(tmp_path),
        seq_len=32,
        max_steps=3,
        progress=False,
        plot=False,
        lr=1e-2,
    )
    summary = run(cfg, log=quiet)
    assert summary["steps"] == 3 and summary["data"][0]["kind"] == "synthetic copy task"


@pytest.mark.skipif(
    not qlora_available(),
    reason="lorakit.qlora (quantize_model, prepare_for_kbit_training) is not in this install",
)
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_qlora_trains_an_adapter(llama, tmp_path, quant_type):
    summary = run(config(llama, tmp_path, max_steps=6, method="qlora", quant_type=quant_type), log=quiet)
    train = [r["loss"] for r in losses(tmp_path) if "loss" in r]
    assert math.isfinite(train[-1]) and train[-1] < train[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["trainable_params"] < summary["total_params"]
    # the fp32 model would hold 4 bytes per parameter; its Linear weights now take 0.5 (nf4) or 1 (int8)
    assert summary["model_bytes"] < 0.55 * 4 * summary["total_params"]


def test_the_callers_config_is_not_changed(llama, tmp_path):
    cfg = config(llama, tmp_path, max_steps=1, seq_len=0)
    run(cfg, log=quiet)
    assert cfg.seq_len == 0
    assert TrainConfig.load(tmp_path / "train_config.toml").seq_len == 128  # resolved: the model's limit


def test_dora_trains_saves_and_merges(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.train.export import merged_model

    run(config(llama, tmp_path, max_steps=4, use_dora=True), log=quiet)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    ids = torch.randint(9, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    merged, _ = merged_model(str(llama[0]), str(tmp_path / "adapter"))
    reference = AutoModelForCausalLM.from_pretrained(llama[0]).eval()
    lorakit.load_adapter(reference, tmp_path / "adapter")
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() < 1e-5


def test_rng_state_round_trip_and_no_cuda_start():
    """The checkpoint's RNG state restores torch, Python and NumPy streams; a run that never used CUDA records
    no CUDA state (saving it must not start CUDA on a GPU machine)."""
    import random

    import numpy as np

    from lorakit.train import checkpoint

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    state = checkpoint.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    if not torch.cuda.is_initialized():
        assert state["cuda"] == [] and not torch.cuda.is_initialized()


def test_fast_needs_a_gpu_and_says_so_before_any_work(llama, tmp_path):
    out = tmp_path / "fast"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run(config(llama, out, fast=True, device="cpu"), log=quiet)
    assert not out.exists()


def test_fast_takes_the_loss_from_the_model_with_the_same_numbers(llama, tmp_path, monkeypatch):
    """--fast's loop path (loss summed by the model: labels in, num_items_in_batch=1) gives the losses of the
    default path (logits out, lorakit's own sum), grad accumulation included. liger-kernel itself needs a GPU:
    here its installation is skipped, the loop path is what is checked."""
    from lorakit.train import runner

    monkeypatch.setattr(runner, "check_fast", lambda task, device: None)
    monkeypatch.setattr(runner, "fast_base", lambda model: "llama")
    kw = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "device": "cpu"}
    run(config(llama, tmp_path / "plain", **kw), log=quiet)
    run(config(llama, tmp_path / "fast", fast=True, **kw), log=quiet)
    plain = [r["loss"] for r in losses(tmp_path / "plain") if "loss" in r]
    fast = [r["loss"] for r in losses(tmp_path / "fast") if "loss" in r]
    assert len(plain) == 4 and fast == pytest.approx(plain, abs=1e-6)
    assert plain[-1] < plain[0]


def test_fused_head_loss_follows_the_logits_path_train_and_eval(llama, tmp_path, monkeypatch):
    """The loop's default for a causal LM with a frozen plain head (lorakit's fused head + loss: no logits
    tensor) trains and evaluates like the logits path, grad accumulation included."""
    from lorakit.train import loop

    kw = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "device": "cpu"}
    calls = []
    real = loop.fused_head_loss
    monkeypatch.setattr(loop, "fused_head_loss", lambda *a: calls.append(1) or real(*a))
    run(config(llama, tmp_path / "fused", **kw), log=quiet)
    assert calls  # the fused path really ran
    calls.clear()
    run(config(llama, tmp_path / "logits", fused_loss=False, **kw), log=quiet)  # --no-fused-loss
    assert not calls
    fused, logits = losses(tmp_path / "fused"), losses(tmp_path / "logits")
    assert [r["loss"] for r in fused if "loss" in r] == pytest.approx([r["loss"] for r in logits if "loss" in r],
                                                                     abs=1e-5)
    ev_f, ev_l = [r for r in fused if "eval_loss" in r], [r for r in logits if "eval_loss" in r]
    assert ev_f and ev_f[-1]["eval_loss"] == pytest.approx(ev_l[-1]["eval_loss"], abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="--fast runs liger-kernel's Triton kernels on a GPU")
def test_fast_on_a_gpu_follows_the_default_loss_curve(llama, tmp_path):
    """On a GPU with liger-kernel: --fast (fused RMSNorm/RoPE/SwiGLU, linear + cross-entropy) trains the same
    curve as the default path, within bf16 autocast noise. In subprocesses: liger patches transformers'
    Llama module for the whole process, which must not leak into the other tests."""
    import subprocess
    import sys

    model, data = llama
    for name, extra in (("plain", []), ("fast", ["--fast"])):
        cmd = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data), "--output-dir",
               str(tmp_path / name), "--seq-len", "32", "--max-steps", "6", "--batch-size", "2", "--grad-accum",
               "2", "--lr", "5e-3", "--device", "cuda", "--dtype", "bf16", "--no-progress", "--no-plot",
               "--save-every", "0", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    plain = [r["loss"] for r in losses(tmp_path / "plain") if "loss" in r]
    fast = [r["loss"] for r in losses(tmp_path / "fast") if "loss" in r]
    assert len(fast) == 6 and fast == pytest.approx(plain, abs=5e-2)
    assert fast[-1] < fast[0]


def test_cuda_graphs_need_a_gpu_and_lora_and_say_so_before_any_work(llama, tmp_path):
    out = tmp_path / "graphs"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run(config(llama, out, cuda_graphs=True, device="cpu"), log=quiet)
    assert not out.exists()
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="method lora"):
            run(config(llama, out, cuda_graphs=True, method="full", device="cuda"), log=quiet)
        assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_follow_the_eager_loss_curve(llama, tmp_path):
    """--cuda-graphs with --packing (one shape, no padding mask: the layers replay) trains the eager run's curve:
    fp32 adapters under bf16 autocast, gradient accumulation, AdamW updating the weights the graphs read."""
    kw = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "device": "cuda", "packing": True}
    run(config(llama, tmp_path / "eager", **kw), log=quiet)
    summary = run(config(llama, tmp_path / "graphs", cuda_graphs=True, **kw), log=quiet)
    assert summary["graphed_layer_calls"] > 0, summary["eager_layer_calls"]
    eager = [r["loss"] for r in losses(tmp_path / "eager") if "loss" in r]
    graphed = [r["loss"] for r in losses(tmp_path / "graphs") if "loss" in r]
    assert len(graphed) == 6 and graphed == pytest.approx(eager, abs=1e-2)
    assert graphed[-1] < graphed[0] - 0.1


def test_optimizer_is_torchs_fused_adamw_where_it_applies_and_steps_as_the_default():
    """optimizer_for takes fused AdamW for plain CPU/CUDA float parameters (LoRA+ groups too), not for mixed
    devices or tensor subclasses; its steps stay within fp32 rounding of the default (foreach) AdamW's."""
    from torch import nn

    import lorakit as lk
    from lorakit.train.loop import fused_adamw_applies, optimizer_for

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = optimizer_for(model, 1e-2, 0.01)
    assert all(g["fused"] for g in fused.param_groups)
    assert all(g["fused"] for g in optimizer_for(model, 1e-2, 0.01, loraplus_ratio=16).param_groups)
    start = [p.detach().clone() for p in params]
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))

    def train(opt):
        for _ in range(5):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in params]

    after_fused = train(fused)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    reference = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)
    after_default = train(reference)
    for a, b, s in zip(after_fused, after_default, start):
        assert not torch.equal(a, s)  # the parameters moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    assert not fused_adamw_applies([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_adamw_applies([nn.Parameter(torch.zeros(2, dtype=torch.float64)).to(torch.int64)])

    class Sub(torch.Tensor):  # a tensor subclass stands in for a sharded DTensor
        pass

    assert not fused_adamw_applies([nn.Parameter(torch.zeros(2).as_subclass(Sub))])
    assert fused_adamw_applies([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
