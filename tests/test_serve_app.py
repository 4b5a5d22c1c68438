"""lorakit serve over HTTP: uvicorn on 127.0.0.1 (ephemeral port) in a thread, httpx as the client.

Server outputs equal offline Hugging Face generate with the same adapter (greedy, same tokens); a mixed batch
equals per-request runs; adapters hot-load and unload while other requests stream; every bad input of the
issue gets its status; 200 requests, 16 at a time over 10 adapters, all answered correctly; shutdown drains.
"""

import asyncio
import json
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import (
    LiveServer,
    load_model,
    offline_generate,
    save_random_adapter,
    save_tiny_model,
    tiny_tokenizer,
)

import lorakit
from lorakit.serve.app import ServerLimits, create_app
from lorakit.serve.engine import Engine, EngineConfig

KEY = "test-key-123"
N_ADAPTERS = 10
PROMPTS = ["hello world", "the quick brown fox", "a pirate sails the"]
MAX_TOKENS = 8
AUTH = {"Authorization": f"Bearer {KEY}"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_app")
    model_dir = save_tiny_model(root / "tiny")
    other = save_tiny_model(root / "other", hidden_size=48, intermediate_size=96)
    adapters = root / "adapters"
    adapters.mkdir()
    for i in range(N_ADAPTERS):
        save_random_adapter(model_dir, adapters / f"a{i}", seed=i + 1, r=2 + i % 3)
    save_random_adapter(other, adapters / "wrong_base", seed=99)
    spare = save_random_adapter(model_dir, root / "spare", seed=50)  # copied in later: hot load
    tok = tiny_tokenizer()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    expected = {}
    for name in [None] + [f"a{i}" for i in range(N_ADAPTERS)] + ["spare"]:
        model = load_model(model_dir)
        if name is not None:
            lorakit.load_adapter(model, spare if name == "spare" else adapters / name)
        for j, ids in enumerate(prompts):
            expected[(name, j)] = offline_generate(model_dir, None, ids, MAX_TOKENS, model=model)
    return dict(root=root, model_dir=model_dir, adapters=adapters, spare=spare, tok=tok, prompts=prompts,
                expected=expected)


@pytest.fixture()
def server(world):
    engine = Engine(load_model(world["model_dir"]), world["tok"], world["adapters"],
                    EngineConfig(max_batch=8, max_adapters_gpu=4, max_adapters_cpu=6, max_model_len=96),
                    base_name="tiny")
    limits = ServerLimits(max_body_bytes=4096, max_prompt_tokens=40, max_tokens=80)
    with LiveServer(create_app(engine, api_key=KEY, limits=limits)) as live:
        live.engine = engine
        yield live
    for folder in ("spare",):  # undo hot-load copies
        shutil.rmtree(world["adapters"] / folder, ignore_errors=True)


def client(server, **kw):
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=30, **kw)


def complete(c, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **kw}
    return c.post("/v1/completions", json=body)


def stream_events(c, path, body):
    events = []
    with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------------------------------ outputs
def test_models_list_base_and_adapters(server):
    with client(server) as c:
        data = c.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "tiny" and set(ids[1:]) == {f"a{i}" for i in range(N_ADAPTERS)} | {"wrong_base"}
    assert all(m["parent"] == "tiny" for m in data[1:])
    with client(server) as c:
        assert c.get("/v1/models/a3").json()["id"] == "a3" and c.get("/v1/models/tiny").json()["parent"] is None
        assert c.get("/v1/models/nope").status_code == 404


def test_completions_equal_offline_generate(server, world):
    with client(server) as c:
        for name in ["tiny", "a0", "a3", "a7"]:
            for j, text in enumerate(PROMPTS[:3]):
                r = complete(c, name, text)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                want = world["expected"][(None if name == "tiny" else name, j)]
                assert choice["token_ids"] == want
                assert choice["text"] == world["tok"].decode(want, skip_special_tokens=True)
                assert r.json()["usage"]["completion_tokens"] == len(want)


def test_streaming_equals_non_streaming(server, world):
    with client(server) as c:
        chunks = stream_events(c, "/v1/completions", {"model": "a2", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                                      "temperature": 0, "stream": True,
                                                      "stream_options": {"include_usage": True}})
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        want = world["expected"][("a2", 1)]
        assert text == world["tok"].decode(want, skip_special_tokens=True)
        assert chunks[-1]["usage"]["completion_tokens"] == len(want)
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_streaming_and_not(server, world):
    tok = world["tok"]
    messages = [{"role": "user", "content": "what is the capital of france?"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    model = load_model(world["model_dir"])
    lorakit.load_adapter(model, world["adapters"] / "a5")
    want = offline_generate(world["model_dir"], None, ids, MAX_TOKENS, model=model)
    body = {"model": "a5", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    with client(server) as c:
        r = c.post("/v1/chat/completions", json={**body, "return_token_ids": True}).json()
        assert r["object"] == "chat.completion" and r["choices"][0]["token_ids"] == want
        assert r["choices"][0]["message"] == {"role": "assistant",
                                              "content": tok.decode(want, skip_special_tokens=True)}
        chunks = stream_events(c, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == r["choices"][0]["message"][
        "content"]


def test_mixed_batch_equals_per_request_runs(server, world):
    """One request with several prompts and n=2, plus concurrent single requests on other adapters."""
    expected = world["expected"]
    with client(server) as c:
        r = c.post("/v1/completions", json={"model": "a4", "prompt": PROMPTS[:3], "n": 2, "max_tokens": MAX_TOKENS,
                                            "temperature": 0, "return_token_ids": True}).json()
    assert [ch["token_ids"] for ch in r["choices"]] == [expected[("a4", j)] for j in range(3) for _ in range(2)]
    assert [ch["index"] for ch in r["choices"]] == list(range(6))

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as ac:
            jobs = [(name, j) for name in ["a1", None, "a6", "a8"] for j in range(len(PROMPTS))]
            rs = await asyncio.gather(*(ac.post("/v1/completions", json={
                "model": name or "tiny", "prompt": PROMPTS[j], "max_tokens": MAX_TOKENS, "temperature": 0,
                "return_token_ids": True}) for name, j in jobs))
            return jobs, rs

    jobs, rs = asyncio.run(burst())
    assert [r.json()["choices"][0]["token_ids"] for r in rs] == [expected[k] for k in jobs]
    assert server.engine.stats()["decode_rows_total"] > server.engine.stats()["decode_steps_total"]


def test_seed_makes_sampling_reproducible(server):
    body = {"model": "a1", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.3, "top_p": 0.95, "seed": 11,
            "return_token_ids": True}
    with client(server) as c:
        a = c.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        b = c.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        other = c.post("/v1/completions", json={**body, "seed": 12}).json()["choices"][0]["token_ids"]
    assert a == b and a != other


def test_stop_strings(server, world):
    with client(server) as c:
        full = complete(c, "a0", PROMPTS[2], max_tokens=20).json()["choices"][0]["text"]
        stop = full[2:4]
        cut = complete(c, "a0", PROMPTS[2], max_tokens=20, stop=[stop, "zzzz"]).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"


# ------------------------------------------------------------------------------------------ hot load / unload
def test_hot_load_and_unload_while_others_stream(server, world):
    expected = world["expected"]
    results = {}

    def long_stream(name, key):
        with client(server) as c:
            chunks = stream_events(c, "/v1/completions", {"model": name, "prompt": PROMPTS[0], "max_tokens": 60,
                                                          "temperature": 0, "stream": True,
                                                          "return_token_ids": True})
        results[key] = [t for ch in chunks for t in ch["choices"][0].get("token_ids", [])]

    threads = [threading.Thread(target=long_stream, args=("a9", "a9")),
               threading.Thread(target=long_stream, args=("a3", "a3"))]
    for t in threads:
        t.start()
    with client(server) as c:
        for _ in range(200):  # both streams are running
            if server.engine.stats()["running"] >= 2:
                break
            time.sleep(0.01)
        assert complete(c, "spare", PROMPTS[1]).status_code == 404
        shutil.copytree(world["spare"], world["adapters"] / "spare")
        r = c.post("/v1/adapters", json={"name": "spare"})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "spare" and r.json()["rank"] == 4
        assert complete(c, "spare", PROMPTS[1]).json()["choices"][0]["token_ids"] == expected[("spare", 1)]
        assert c.post("/v1/adapters", json={"name": "spare"}).status_code == 409
        assert c.delete("/v1/adapters/a9").json() == {"id": "a9", "object": "adapter", "deleted": True}
        assert complete(c, "a9", PROMPTS[1]).status_code == 404
        assert "a9" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.delete("/v1/adapters/a9").status_code == 404
        for t in threads:
            t.join(30)
        assert c.post("/v1/adapters", json={"name": "a9"}).status_code == 201  # serve it again
        assert complete(c, "a9", PROMPTS[0]).json()["choices"][0]["token_ids"] == expected[("a9", 0)]
    # the deleted adapter's stream finished with that adapter's tokens
    for name in ("a9", "a3"):
        want = expected[(name, 0)]
        assert results[name][:len(want)] == want


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_get_clear_errors_and_the_server_stays_up(server, world):
    with client(server) as c:
        def post(path, body=None, raw=None, headers=None, status=400):
            r = c.post(path, json=body, content=raw, headers=headers)
            assert r.status_code == status, (body, raw, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"]
            return err

        post("/v1/completions", raw=b'{"model": "a0", "prompt": ', headers={"content-type": "application/json"})
        post("/v1/completions", raw=b"\xff\xfe", headers={"content-type": "application/json"})
        post("/v1/completions", body=[1, 2])
        post("/v1/completions", body={"prompt": "hi"})
        post("/v1/completions", body={"model": "a0"})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "max_tokens": "5"})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "max_tokens": 0})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "max_tokens": 81})  # over the server cap
        post("/v1/completions", body={"model": "a0", "prompt": [1] * 41})  # prompt over 40 tokens
        post("/v1/completions", body={"model": "a0", "prompt": [1] * 30, "max_tokens": 70})  # over the context
        post("/v1/completions", body={"model": "a0", "prompt": [1, 10**6]})
        post("/v1/completions", body={"model": "a0", "prompt": ""})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "temperature": -1})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "top_p": 0})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "n": 17})
        post("/v1/completions", body={"model": "a0", "prompt": "hi", "stop": [""]})
        assert post("/v1/completions", body={"model": "a0", "prompt": "hi", "logprobs": 3})["param"] == "logprobs"
        post("/v1/chat/completions", body={"model": "a0", "messages": [{"role": "wizard", "content": "x"}]})
        post("/v1/chat/completions", body={"model": "a0", "messages": []})
        post("/v1/completions", raw=b"x" * 5000, headers={"content-type": "application/json"}, status=413)
        err = post("/v1/completions", body={"model": "nope", "prompt": "hi"}, status=404)
        assert err["code"] == "model_not_found"
        post("/v1/completions", body={"model": "../tiny", "prompt": "hi"}, status=404)
        # adapter for another base: on use and on hot load, 422 naming the offending key
        err = post("/v1/completions", body={"model": "wrong_base", "prompt": "hi"}, status=422)
        assert err["param"].startswith("base_model.model.model.layers.") and err["param"] in err["message"]
        os.symlink(world["spare"], world["adapters"] / "escape")
        try:
            post("/v1/adapters", body={"name": "../spare"})
            post("/v1/adapters", body={"name": "a/b"})
            assert "outside" in post("/v1/adapters", body={"name": "escape"})["message"]
        finally:
            os.unlink(world["adapters"] / "escape")
        post("/v1/adapters", body={"name": "does_not_exist"}, status=404)
        post("/v1/adapters", body={"nom": "x"})
        post("/v1/adapters", body={"name": "tiny"}, status=409)
        # authentication
        assert httpx.get(server.url + "/v1/models").status_code == 401
        r = httpx.post(server.url + "/v1/completions", json={"model": "a0", "prompt": "hi"},
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        # still serving, and the failures are counted
        assert complete(c, "a0", PROMPTS[0]).json()["choices"][0]["token_ids"] == world["expected"][("a0", 0)]
        metrics = c.get("/metrics").text
    assert 'lorakit_http_responses_total{status="400"}' in metrics
    assert 'lorakit_http_responses_total{status="422"}' in metrics
    assert "lorakit_adapters{tier=\"device\"}" in metrics


# ------------------------------------------------------------------------------------------ load
def test_200_requests_16_at_a_time_over_10_adapters(server, world):
    expected = world["expected"]
    jobs = [(f"a{i % N_ADAPTERS}" if i % 7 else None, i % len(PROMPTS), i % 3 == 0) for i in range(200)]

    async def one(ac, sem, name, j, stream):
        body = {"model": name or "tiny", "prompt": PROMPTS[j], "max_tokens": MAX_TOKENS, "temperature": 0,
                "return_token_ids": True, "stream": stream}
        async with sem:
            if not stream:
                r = await ac.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]
            tokens = []
            async with ac.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        tokens += json.loads(line[6:])["choices"][0].get("token_ids", [])
            return tokens

    async def main():
        sem = asyncio.Semaphore(16)
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60, limits=limits) as ac:
            return await asyncio.gather(*(one(ac, sem, *job) for job in jobs))

    t0 = time.perf_counter()
    got = asyncio.run(main())
    seconds = time.perf_counter() - t0
    assert len(got) == 200
    wrong = [(job, g) for job, g in zip(jobs, got) if g != expected[job[:2]]]
    assert not wrong, wrong[:3]
    stats = server.engine.stats()
    assert stats["requests_failed"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["adapter_device_evictions"] > 0  # 10 adapters through 4 device slots
    assert seconds < 60


# ------------------------------------------------------------------------------------------ shutdown
def test_shutdown_drains_in_flight_streams(world):
    engine = Engine(load_model(world["model_dir"]), world["tok"], world["adapters"],
                    EngineConfig(max_batch=4, max_model_len=96), base_name="tiny")
    live = LiveServer(create_app(engine))
    got = {}

    def stream():
        with httpx.Client(base_url=live.url, timeout=30) as c:
            got["chunks"] = stream_events(c, "/v1/completions", {
                "model": "a1", "prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0, "stream": True,
                "return_token_ids": True})

    t = threading.Thread(target=stream)
    t.start()
    for _ in range(300):
        if engine.stats()["generation_tokens_total"] > 0:
            break
        time.sleep(0.01)
    live.stop()  # graceful: waits for the stream, then drains the engine
    t.join(30)
    tokens = [tok for ch in got["chunks"] for tok in ch["choices"][0].get("token_ids", [])]
    assert tokens[:MAX_TOKENS] == world["expected"][("a1", 0)][:MAX_TOKENS]
    assert got["chunks"][-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert engine.closing
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.url + "/health", timeout=2)


# ------------------------------------------------------------------------------------------ command line
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_server_drains_on_sigterm(world):
    """``python -m lorakit.serve.cli`` (what ``lorakit serve`` runs): serves with an API key from the
    environment, and on SIGTERM finishes the stream in flight before it exits."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "LORAKIT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorakit.serve.cli", "--model", str(world["model_dir"]), "--adapters",
           str(world["adapters"]), "--port", str(port), "--max-batch", "4", "--max-model-len", "96",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s for imports and model loading
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            got = complete(c, "a2", PROMPTS[0]).json()["choices"][0]["token_ids"]
            assert got == world["expected"][("a2", 0)]
            tokens, finish = [], None
            body = {"model": "a4", "prompt": PROMPTS[1], "max_tokens": 80, "temperature": 0, "stream": True,
                    "return_token_ids": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    if not tokens:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    tokens += choice.get("token_ids", [])
                    finish = choice["finish_reason"] or finish
        assert finish in ("stop", "length")
        assert tokens[:MAX_TOKENS] == world["expected"][("a4", 1)]
        # uvicorn re-raises the signal once it has drained: exit status 0 or "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from lorakit.serve import cli

    assert cli.main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def test_command_line_quantize_flag(tmp_path, capsys):
    from lorakit.serve import cli

    assert cli.main(["--model", str(tmp_path / "missing"), "--quantize", "nf4"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path), "--quantize", "nf3"])
    assert "invalid choice: 'nf3'" in capsys.readouterr().err
