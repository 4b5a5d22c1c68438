"""The `lorakit` command end to end on tiny models built from configs and saved to temp folders.

train (causal LM and classifier; TOML + flags; resume after a simulated kill), generate (adapters switched in
place, checked against fresh single-adapter models), merge (plain transformers load, logits within 1e-5),
compare (table, JSON, chart), and bad inputs: one error line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers_train import (
    make_causal_lm,
    make_classifier,
    sentences,
    sentiment_records,
    text_records,
    write_jsonl,
)

from lorakit import cli
from lorakit.train import TrainConfig, run
from lorakit.train.modeling import qlora_available

TINY = ["--seq-len", "32", "--no-progress", "--no-plot"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def restore_environment():
    """main() sets HF offline variables and quiets transformers' logging; undo that after each test."""
    import transformers

    env, verbosity = dict(os.environ), transformers.logging.get_verbosity()
    yield
    os.environ.clear()
    os.environ.update(env)
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama and GPT-2, a BERT classifier, data files, and two trained Llama adapters."""
    root = tmp_path_factory.mktemp("cli")
    make_causal_lm(root / "llama")
    make_causal_lm(root / "gpt2", family="gpt2")
    make_classifier(root / "bert")
    text = write_jsonl(root / "text.jsonl", text_records(48))
    qa = write_jsonl(
        root / "qa.jsonl", [{"prompt": f"question {s}", "completion": "yes"} for s in sentences(40, 1)]
    )
    senti = write_jsonl(root / "senti.jsonl", sentiment_records(60))
    quiet = lambda _line: None
    for name, data in (("a", text), ("b", qa)):
        run(
            TrainConfig(
                model=str(root / "llama"),
                data=str(data),
                output_dir=str(root / f"run_{name}"),
                seq_len=32,
                max_steps=15,
                lr=2e-2,
                progress=False,
                plot=False,
                save_every=0,
            ),
            log=quiet,
        )
    run(
        TrainConfig(
            model=str(root / "bert"),
            data=str(senti),
            output_dir=str(root / "run_cls"),
            seq_len=16,
            max_steps=5,
            lr=1e-2,
            progress=False,
            plot=False,
            save_every=0,
        ),
        log=quiet,
    )
    return root


def call(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help and usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ train
def test_train_causal_lm_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = call(
        capsys,
        "train",
        "--model",
        files / "llama",
        "--data",
        files / "text.jsonl",
        "--output-dir",
        out,
        "--max-steps",
        30,
        "--lr",
        "1e-2",
        "--batch-size",
        8,
        "--eval-every",
        10,
        "--seq-len",
        32,
        "--no-progress",
    )
    assert rc == 0, err
    assert "done: 30 steps" in stdout and "Traceback" not in err
    train = [r["loss"] for r in metrics(out) if "loss" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.3
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "train_config.toml",
        "summary.json",
        "loss.png",
    ):
        assert (out / name).is_file(), name


def test_train_gpt2_prompt_completion_with_toml_and_flag_override(files, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{files / "gpt2"}"\ndata = "{files / "qa.jsonl"}"\nbatch_size = 2\nlr = 1.0\n'
        f'max_steps = 4\noutput_dir = "{tmp_path / "out"}"\ntarget_modules = "c_attn,c_proj"\n'
    )
    rc, _, err = call(capsys, "train", "--config", toml, "--lr", "5e-3", *TINY)
    assert rc == 0, err
    resolved = TrainConfig.load(tmp_path / "out" / "train_config.toml")
    assert (resolved.lr, resolved.batch_size, resolved.max_steps) == (5e-3, 2, 4)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["c_attn", "c_proj"] and saved["fan_in_fan_out"] is True


def test_train_classifier_reports_accuracy(files, tmp_path, capsys):
    rc, stdout, err = call(
        capsys,
        "train",
        "--model",
        files / "bert",
        "--data",
        files / "senti.jsonl",
        "--output-dir",
        tmp_path,
        "--max-steps",
        3,
        "--eval-fraction",
        "0.25",
        *TINY[2:],
    )
    assert rc == 0, err
    assert "accuracy" in stdout
    assert "eval_accuracy" in metrics(tmp_path)[-1]


def test_resume_after_a_kill_gives_the_same_losses(files, tmp_path, capsys, monkeypatch):
    class KillAt:
        def on_step_end(self, state, record):
            if state.step == 5:
                raise KeyboardInterrupt

    common = [
        "--model",
        files / "llama",
        "--data",
        files / "text.jsonl",
        "--max-steps",
        8,
        "--save-every",
        2,
        "--dropout",
        "0.1",
        "--grad-accum",
        2,
        *TINY,
    ]
    rc, _, err = call(capsys, "train", *common, "--output-dir", tmp_path / "full")
    assert rc == 0, err
    monkeypatch.setattr(cli, "TRAIN_HOOKS", [KillAt()])
    rc, _, err = call(capsys, "train", *common, "--output-dir", tmp_path / "killed")
    assert rc == 130 and "interrupted (continue with --resume)" in err
    monkeypatch.setattr(cli, "TRAIN_HOOKS", [])
    rc, _, err = call(capsys, "train", *common, "--output-dir", tmp_path / "killed", "--resume")
    assert rc == 0, err
    timing = ("step_time_s", "tokens_per_s", "memory_mb")
    same = [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "full")]
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "killed")] == same


# ------------------------------------------------------------------------------------------ generate
def _reference(files, adapters: list[str], prompt: str, new_tokens: int) -> str:
    """Greedy completion from a freshly loaded base with exactly these adapters active."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit

    tok = AutoTokenizer.from_pretrained(files / "llama")
    model = AutoModelForCausalLM.from_pretrained(files / "llama").eval()
    for name in adapters:
        lorakit.load_adapter(model, files / f"run_{name}" / "adapter", name=name)
    if adapters:
        lorakit.set_active_adapters(model, adapters)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_generate_switches_adapters_in_place(files, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    prompts = ["the cat", "question a dog sees"]
    rc, stdout, err = call(
        capsys,
        "generate",
        "--model",
        files / "llama",
        "--adapter",
        f"a={files / 'run_a/adapter'}",
        "--adapter",
        f"b={files / 'run_b/adapter'}",
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--base",
        "--combine",
        "--json",
        "--max-new-tokens",
        6,
    )
    assert rc == 0, err
    assert len(loads) == 1  # one base model for every prompt and adapter
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [
        (p, a) for p in prompts for a in ("base", "a", "b", "a+b")
    ]
    monkeypatch.undo()
    expected = {"base": [], "a": ["a"], "b": ["b"], "a+b": ["a", "b"]}
    for r in rows:
        assert r["completion"] == _reference(files, expected[r["adapter"]], r["prompt"], 6), r
    assert len({r["completion"] for r in rows if r["prompt"] == prompts[1]}) > 1  # the adapters do differ


@pytest.fixture(scope="module")
def qlora_adapter(files, tmp_path_factory):
    """A QLoRA adapter trained by lorakit train on the tiny Llama (NF4 + double quant base)."""
    if not qlora_available():
        pytest.skip("lorakit.qlora is not available in this install")
    out = tmp_path_factory.mktemp("cli_q") / "run_q"
    run(TrainConfig(model=str(files / "llama"), data=str(files / "text.jsonl"), output_dir=str(out), seq_len=32,
                    max_steps=6, lr=2e-2, progress=False, plot=False, save_every=0, method="qlora"),
        log=lambda _line: None)
    info = json.loads((out / "adapter" / "lorakit_train.json").read_text())
    assert (info["quantization"], info["double_quant"]) == ("nf4", True)
    return out / "adapter"


def test_generate_with_a_qlora_adapter_uses_the_4bit_base_it_was_trained_on(files, qlora_adapter, capsys):
    """lorakit_train.json records the quant type; `generate --quantize auto` (the default) then streams the
    base into NF4 as training did, and its text equals HF generate on load_quantized + the adapter;
    `--quantize none` equals the 16-bit base + the adapter."""
    from transformers import AutoTokenizer

    import lorakit

    adapter = qlora_adapter
    tok = AutoTokenizer.from_pretrained(files / "llama")
    prompt = "a b c"

    def reference(quantized: bool) -> str:
        if quantized:
            model = lorakit.load_quantized(files / "llama", dtype=torch.float32, compute_dtype=torch.float32)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(files / "llama")
        lorakit.load_adapter(model.eval(), adapter)
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids_out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
        return tok.decode(ids_out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    texts = {}
    for flag, quantized in (("auto", True), ("none", False)):
        rc, stdout, err = call(capsys, "generate", "--model", files / "llama", "--adapter", adapter, "--prompt",
                               prompt, "--json", "--max-new-tokens", 6, "--quantize", flag)
        assert rc == 0, err
        row = json.loads(stdout)
        assert row["base"] == ("nf4" if quantized else "none")  # "auto" really ran on the 4-bit base
        texts[flag] = row["completion"]
        assert texts[flag] == reference(quantized), flag


def test_merge_a_qlora_adapter_folds_it_into_the_dequantized_base(files, qlora_adapter, tmp_path, capsys):
    """`merge --quantize auto` writes D(Q(W0)) + s·B·A: the 16-bit model computes what the QLoRA model computed
    in training (within 1e-5); `--quantize none` writes W0 + s·B·A, which differs from it."""
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.randint(9, 60, (3, 20), generator=torch.Generator().manual_seed(0))
    qlora = lorakit.load_quantized(files / "llama", dtype=torch.float32, compute_dtype=torch.float32)
    want = _logits_with_adapter(qlora.eval(), qlora_adapter, ids)
    got = {}
    for flag in ("auto", "none"):
        out = tmp_path / flag
        rc, stdout, err = call(capsys, "merge", "--model", files / "llama", "--adapter", qlora_adapter, "--out", out,
                               "--quantize", flag)
        assert rc == 0, err
        assert ("nf4 weights, dequantized" in stdout) == (flag == "auto")
        with torch.no_grad():
            got[flag] = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert (got["auto"] - want).abs().max() < 1e-5
    dense = _logits_with_adapter(AutoModelForCausalLM.from_pretrained(files / "llama").eval(), qlora_adapter, ids)
    assert (got["none"] - dense).abs().max() < 1e-5
    assert (got["none"] - want).abs().max() > 1e-3  # the two merges really differ


# ------------------------------------------------------------------------------------------ merge
def _logits_with_adapter(model, adapter, ids):
    import lorakit

    lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_causal_lm_loads_in_plain_transformers(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    rc, _, err = call(
        capsys, "merge", "--model", files / "llama", "--adapter", files / "run_a/adapter", "--out", out
    )
    assert rc == 0, err
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert "lora" not in (out / "config.json").read_text().lower()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(9, 60, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    want = _logits_with_adapter(
        AutoModelForCausalLM.from_pretrained(files / "llama").eval(), files / "run_a/adapter", ids
    )
    base = AutoModelForCausalLM.from_pretrained(files / "llama").eval()(input_ids=ids).logits.detach()
    assert (want - base).abs().max() > 1e-3  # the adapter changes the outputs ...
    # ... and the merged model computes the same thing (fp32; W + sBA rounded once per weight, then a deep
    # stack: 2.1e-5 seen on a 16-core box whose BLAS sums in another order, so 1e-4 at logits of ~0.3)
    assert (got - want).abs().max() < 1e-4
    rc, _, err = call(
        capsys, "merge", "--model", files / "llama", "--adapter", files / "run_a/adapter", "--out", out
    )
    assert rc == 2 and "--force" in err


def test_merge_classifier_keeps_the_trained_head(files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    rc, _, err = call(
        capsys, "merge", "--model", files / "bert", "--adapter", files / "run_cls/adapter", "--out", out
    )
    assert rc == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.randint(9, 60, (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    want = _logits_with_adapter(
        AutoModelForSequenceClassification.from_pretrained(files / "bert").eval(),
        files / "run_cls/adapter",
        ids,
    )
    assert (got - want).abs().max() < 1e-5
    rc, _, err = call(capsys, "merge", "--model", files / "bert", "--adapter", files / "run_cls/adapter", "--out",
                      tmp_path / "q", "--quantize", "nf4")
    assert rc == 2 and "--quantize nf4 merges causal LMs" in err and not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------ compare
def test_compare_prints_a_table_and_writes_a_chart(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, stdout, err = call(
        capsys,
        "compare",
        "--model",
        files / "llama",
        "--data",
        files / "text.jsonl",
        "--methods",
        "full,lora,qlora",
        "--steps",
        3,
        "--output-dir",
        tmp_path,
        *TINY,
    )
    assert rc == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    full, lora = rows["full"], rows["lora"]
    n_base = sum(
        p.numel()
        for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(files / "llama").parameters()
    )
    assert full["trainable_params"] == n_base and 0 < lora["trainable_params"] < n_base
    assert full["checkpoint_mb"] > lora["checkpoint_mb"] and full["saved_mb"] > lora["saved_mb"]
    assert full["peak_memory_mb"] > 0 and lora["seconds_per_step"] > 0 and full["steps"] == lora["steps"] == 3
    if qlora_available():
        assert rows["qlora"]["trainable_params"] == lora["trainable_params"]
        assert rows["qlora"]["trainable_percent"] == pytest.approx(lora["trainable_percent"])
        assert rows["qlora"]["model_mb"] < 0.5 * lora["model_mb"]  # 4-bit Linear weights
    else:
        assert "not available" in rows["qlora"]["error"]
    assert "| full |" in stdout and "| lora |" in stdout and "trainable params" in stdout
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_cases(files, tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    bad_lr = tmp / "bad_lr.toml"
    bad_lr.write_text(f'model = "{files / "llama"}"\ndata = "{files / "text.jsonl"}"\nlr = "fast"\n')
    csv = tmp / "d.csv"
    csv.write_text("sentence,label\nthe cat was good .,1\n")
    llama, text = files / "llama", files / "text.jsonl"
    return [
        ("missing data file", ["train", "--model", llama, "--data", tmp / "nope.jsonl"], "does not exist"),
        ("missing model", ["train", "--model", tmp / "no_model", "--data", text], "does not exist"),
        ("empty data", ["train", "--model", llama, "--data", empty], "is empty"),
        (
            "missing column",
            ["train", "--model", llama, "--data", text, "--text-column", "body"],
            "no column 'body'",
        ),
        ("csv column", ["train", "--model", files / "bert", "--data", csv], "no column 'text'"),
        (
            "seq len",
            ["train", "--model", llama, "--data", text, "--seq-len", 4096],
            "over the model's limit of 128",
        ),
        ("lr flag", ["train", "--model", llama, "--data", text, "--lr", "abc"], "invalid float value: 'abc'"),
        ("lr toml", ["train", "--config", bad_lr], "lr must be a number, got 'fast'"),
        ("method", ["train", "--model", llama, "--data", text, "--method", "dora"], "invalid choice: 'dora'"),
        ("fsdp flag", ["train", "--model", llama, "--data", text, "--fsdp-shard-embeddings"],
         "--fsdp-shard-embeddings needs --distributed fsdp, got --distributed auto"),
        (
            "resume nothing",
            ["train", "--model", llama, "--data", text, "--output-dir", tmp / "o", "--resume"],
            "no checkpoint",
        ),
        (
            "merge adapter",
            ["merge", "--model", llama, "--adapter", tmp / "none", "--out", tmp / "m"],
            "does not exist",
        ),
        ("generate prompt", ["generate", "--model", llama], "no prompt"),
        (
            "compare methods",
            ["compare", "--model", llama, "--methods", "lora,magic"],
            "unknown method 'magic'",
        ),
        ("demo", ["demo", "nope"], "unknown demo 'nope'"),
    ]


CASES = [
    "missing data file",
    "missing model",
    "empty data",
    "missing column",
    "csv column",
    "seq len",
    "lr flag",
    "lr toml",
    "method",
    "fsdp flag",
    "resume nothing",
    "merge adapter",
    "generate prompt",
    "compare methods",
    "demo",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_exit_2(files, tmp_path, capsys, case):
    argv, message = next((a, m) for name, a, m in _bad_cases(files, tmp_path) if name == case)
    rc, stdout, err = call(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lorakit {argv[0]}: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err + stdout


def test_train_help_documents_every_setting(capsys):
    rc, stdout, _ = call(capsys, "train", "--help")
    assert rc == 0
    for flag in (
        "--grad-accum",
        "--packing",
        "--chat-loss",
        "--gradient-checkpointing",
        "--resume",
        "--config",
    ):
        assert flag in stdout
    assert "Micro-batches per optimizer step" in stdout


def test_demo_registry_is_a_plain_dict(capsys, monkeypatch):
    monkeypatch.setitem(cli.DEMOS, "fake", lambda args: 7 if args.steps == 3 else 1)
    rc, _, _ = call(capsys, "demo", "fake", "--steps", 3)
    assert rc == 7
    assert cli.DEFAULT_DEMO in cli.DEMOS


@pytest.mark.parametrize(
    "extra",
    [["--method", "prefix", "--prefix-projection", "--num-virtual-tokens", 4],
     ["--init", "pissa_niter_4", "--loraplus-ratio", 16],
     ["--init", "pissa", "--use-dora"]],
    ids=["prefix", "pissa-loraplus", "pissa-dora"],
)
def test_train_other_methods_end_to_end(files, tmp_path, capsys, extra):
    """prefix tuning, PiSSA init, LoRA+ and DoRA through the CLI: the loss falls, the adapter loads back in
    generate, and merge refuses a prefix (it lives in the attention cache) with one line."""
    out = tmp_path / "out"
    rc, stdout, err = call(capsys, "train", "--model", files / "llama", "--data", files / "text.jsonl",
                           "--output-dir", out, "--max-steps", 20, "--lr", "1e-2", "--batch-size", 8,
                           "--seq-len", 32, "--no-progress", *extra)
    assert rc == 0, err
    train = [r["loss"] for r in metrics(out) if "loss" in r]
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4
    rc, stdout, err = call(capsys, "generate", "--model", files / "llama", "--adapter", out / "adapter",
                           "--prompt", "the", "--max-new-tokens", 3)
    assert rc == 0, err
    rc, _, err = call(capsys, "merge", "--model", files / "llama", "--adapter", out / "adapter",
                      "--out", tmp_path / "merged")
    if extra[1] == "prefix":
        assert rc == 2 and "cannot be merged" in err and "Traceback" not in err
    else:
        assert rc == 0, err


def test_quantize_names_agree_with_the_loader():
    """The command line's --quantize names (torch-free train.config) are exactly what load_quantized_named takes."""
    from lorakit.quant_loading import STORAGE_NAMES
    from lorakit.train.config import QUANT_TYPES

    assert QUANT_TYPES == STORAGE_NAMES
