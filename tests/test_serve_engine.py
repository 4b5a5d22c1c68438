"""lorakit.serve.engine: continuous batching with per-row adapters equals offline generation, request by request.

The oracle is Hugging Face ``generate`` (greedy) on a tiny Llama with the adapter loaded through
lorakit.load_adapter. The engine runs with fewer device slots than adapters, so slots are evicted and
reloaded while requests come and go.
"""

import threading
import time

import pytest
from serve_helpers import (
    load_model,
    offline_generate,
    save_random_adapter,
    save_tiny_model,
    tiny_tokenizer,
)

import lorakit
from lorakit.errors import ConfigError
from lorakit.serve.cache import AdapterNotFoundError
from lorakit.serve.engine import (
    Delta,
    Engine,
    EngineClosedError,
    EngineConfig,
    EngineError,
    Finished,
    RequestTooLongError,
)
from lorakit.serve.sampling import SamplingParams

PROMPTS = ["hello world", "the quick brown fox", "a pirate sails the", "what is the capital"]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model_dir = save_tiny_model(root / "model")
    adapters = root / "adapters"
    adapters.mkdir()
    for i in range(4):
        save_random_adapter(model_dir, adapters / f"a{i}", seed=i + 1, r=2 + i % 3)
    tok = tiny_tokenizer()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    expected = {}
    for name in [None, "a0", "a1", "a2", "a3"]:
        model = load_model(model_dir)
        if name is not None:
            lorakit.load_adapter(model, adapters / name)
        for j, ids in enumerate(prompts):
            expected[(name, j)] = offline_generate(model_dir, None, ids, 10, model=model)
    return model_dir, adapters, tok, prompts, expected


def make_engine(setup, **kw):
    model_dir, adapters, tok, _, _ = setup
    config = EngineConfig(**{"max_batch": 4, "max_adapters_gpu": 2, "max_adapters_cpu": 3, "max_model_len": 128,
                             **kw})
    return Engine(load_model(model_dir), tok, adapters, config, base_name="tiny").start()


def test_each_request_equals_offline_generate(setup):
    _, _, _, prompts, expected = setup
    with make_engine(setup) as engine:
        for (name, j), want in expected.items():
            out = engine.submit(prompts[j], GREEDY, name).result()
            assert out.token_ids == want, (name, j)
            assert out.finish_reason == ("stop" if len(want) < 10 else "length")


def test_mixed_batch_equals_per_request_runs(setup):
    """All 20 (adapter, prompt) pairs at once through 4 rows and 2 adapter slots, base rows mixed in."""
    _, _, _, prompts, expected = setup
    with make_engine(setup) as engine:
        keys = list(expected)
        outs = engine.generate([prompts[j] for _, j in keys], GREEDY, [n for n, _ in keys])
        assert [o.token_ids for o in outs] == [expected[k] for k in keys]
        stats = engine.stats()
        assert stats["decode_rows_total"] > 2 * stats["decode_steps_total"]  # rows really were batched
        assert stats["adapter_device_evictions"] > 0  # 4 adapters through 2 slots


def test_requests_join_between_decode_steps(setup):
    _, _, _, prompts, expected = setup
    with make_engine(setup) as engine:
        long = engine.submit(prompts[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), "a0")
        events = iter(long)
        first = next(events)  # the long request is decoding
        assert isinstance(first, Delta)
        steps_before = engine.stats()["decode_steps_total"]
        short = engine.submit(prompts[1], GREEDY, "a1").result()
        assert short.token_ids == expected[("a1", 1)]
        rest = list(events)
        assert isinstance(rest[-1], Finished) and rest[-1].output.completion_tokens == 50
        # the short one finished while the long one was still running: it joined, it did not wait
        assert short.seconds < rest[-1].output.seconds
        assert engine.stats()["decode_steps_total"] - steps_before < 60
        assert rest[-1].output.token_ids[:len(expected[("a0", 0)])] == expected[("a0", 0)]


def test_streamed_pieces_add_up_to_the_text(setup):
    _, _, tok, prompts, expected = setup
    with make_engine(setup) as engine:
        pieces, final = [], None
        for event in engine.submit(prompts[2], GREEDY, "a2"):
            if isinstance(event, Delta):
                pieces.append(event.text)
            else:
                final = event.output
        assert "".join(pieces) == final.text
        assert final.text == tok.decode(expected[("a2", 2)], skip_special_tokens=True)


def test_stop_strings_cut_the_text(setup):
    _, _, _, prompts, _ = setup
    with make_engine(setup) as engine:
        full = engine.submit(prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)).result()
        assert len(full.text) > 6
        stop = full.text[3:6]
        cut = engine.submit(prompts[0], SamplingParams(max_tokens=20, temperature=0, stop=[stop],
                                                       ignore_eos=True))
        pieces = [e.text for e in cut if isinstance(e, Delta)]
        assert "".join(pieces) == full.text[:full.text.index(stop)]


def test_sampling_is_reproducible_with_a_seed_and_independent_of_the_batch(setup):
    _, _, _, prompts, _ = setup
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    with make_engine(setup) as engine:
        alone = engine.submit(prompts[1], hot, "a1").result().token_ids
        crowd = engine.generate([prompts[1], prompts[0], prompts[2]], hot, ["a1", "a0", None])
        assert crowd[0].token_ids == alone
        other = engine.submit(prompts[1], SamplingParams(max_tokens=12, temperature=1.5, seed=8, ignore_eos=True),
                              "a1").result().token_ids
        assert other != alone


def test_cancel_frees_the_row(setup):
    _, _, _, prompts, _ = setup
    with make_engine(setup, max_batch=1) as engine:
        handle = engine.submit(prompts[0], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        next(iter(handle))
        handle.cancel()
        out = handle.result()
        assert out.finish_reason == "abort" and out.completion_tokens < 60
        assert engine.submit(prompts[1], GREEDY).result().completion_tokens >= 1  # the row is free again


def test_bad_requests_are_refused_before_queueing(setup):
    _, _, _, prompts, _ = setup
    with make_engine(setup) as engine:
        with pytest.raises(AdapterNotFoundError):
            engine.submit(prompts[0], GREEDY, "nope")
        with pytest.raises(RequestTooLongError, match="context of 128"):
            engine.submit(prompts[0], SamplingParams(max_tokens=125))
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            engine.submit([1, 99999], GREEDY)
        with pytest.raises(ConfigError, match="empty"):
            engine.submit([], GREEDY)
        with pytest.raises(ConfigError, match="temperature"):
            SamplingParams(temperature=-1)
        assert engine.stats()["waiting"] == 0


def test_a_failing_step_fails_its_requests_not_the_engine(setup, monkeypatch):
    _, _, _, prompts, expected = setup
    with make_engine(setup) as engine:
        real = engine.decoder.prefill
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated device error")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.decoder, "prefill", flaky)
        with pytest.raises(EngineError, match="simulated device error"):
            engine.submit(prompts[0], GREEDY, "a0").result()
        assert engine.submit(prompts[0], GREEDY, "a0").result().token_ids == expected[("a0", 0)]
        assert engine.stats()["step_errors_total"] == 1


def test_shutdown_drains_running_requests_and_refuses_new_ones(setup):
    _, _, _, prompts, _ = setup
    engine = make_engine(setup)
    handles = [engine.submit(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "a3")
               for p in prompts]
    stopper = threading.Thread(target=engine.shutdown, kwargs={"drain": True, "timeout": 30})
    stopper.start()
    time.sleep(0.01)
    with pytest.raises(EngineClosedError):
        engine.submit(prompts[0], GREEDY)
    outs = [h.result() for h in handles]
    stopper.join(30)
    assert not stopper.is_alive()
    assert all(o.completion_tokens == 40 and o.finish_reason == "length" for o in outs)


def test_from_pretrained_with_a_4bit_base_equals_offline_generate_on_it(setup):
    """`lorakit serve --quantize nf4`: the checkpoint is streamed into NF4 projections; greedy tokens equal Hugging
    Face generate on the same load_quantized model with the adapter loaded through lorakit."""
    model_dir, adapters, _, prompts, _ = setup
    config = EngineConfig(max_batch=4, max_adapters_gpu=2, max_model_len=128)
    with Engine.from_pretrained(model_dir, adapters, config, device="cpu", quantize="nf4").start() as engine:
        assert engine.decoder.layers[0].qkv.weight is None  # packed, not fused into a 16-bit weight
        for name in (None, "a1"):
            model = lorakit.load_quantized(model_dir, dtype=engine.decoder.dtype, compute_dtype=engine.decoder.dtype)
            if name is not None:
                lorakit.load_adapter(model, adapters / name)
            want = offline_generate(model_dir, None, prompts[0], 10, model=model.eval())
            assert engine.submit(prompts[0], GREEDY, name).result().token_ids == want, name
    with pytest.raises(ConfigError, match="quantize must be one of"):
        Engine.from_pretrained(model_dir, adapters, config, device="cpu", quantize="nf3")
