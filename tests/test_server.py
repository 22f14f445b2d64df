"""`sli serve`: the OpenAI-compatible server, driven by the real `openai` client over loopback.

Each server runs uvicorn in a thread on 127.0.0.1 (a port the OS picks). A "gate" holds the
engine's thread inside ``step_many`` so that requests pile up deterministically: several
concurrent clients then provably share one pass, and the queue provably fills.
"""
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import uvicorn

from sli.processor import UniversalSLIProcessor
from sli.server import build_app, build_chat_prompt
from sli.synth import synth_model

KEY = "test-key"


def until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def queued(engine):
    stats = engine.stats()
    return stats["active"] + stats["waiting"]


class Served:
    """uvicorn serving ``app`` in a thread on 127.0.0.1:<free port>."""

    def __init__(self, app, engine, processor) -> None:
        self.engine, self.processor = engine, processor
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        until(lambda: self.server.started, 30, "uvicorn to start")

    def client(self, api_key=KEY, timeout=60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=timeout)

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextlib.contextmanager
def gated(processor):
    """Hold the engine's thread at the start of each step until the gate opens."""
    gate = threading.Event()
    real = processor.step_many

    def step_many(items):
        gate.wait(30)
        return real(items)

    processor.step_many = step_many
    try:
        yield gate
    finally:
        gate.set()
        del processor.step_many


@contextlib.contextmanager
def slowed(processor, seconds):
    real = processor.step_many
    processor.step_many = lambda items: (time.sleep(seconds), real(items))[1]
    try:
        yield
    finally:
        del processor.step_many


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("tiny-llama"), family="llama", preset="tiny", with_tokenizer=True)


@contextlib.contextmanager
def serving(model_dir, cache_dir, **app_kwargs):
    # NF4 multiplies float activations at any row count, so a request batched with others must
    # give exactly its lone answer. (INT8/INT4 take int8 activations from 2 rows on: a batched
    # answer can differ from a lone one in its last bits, within those modes' quality bounds.)
    processor = UniversalSLIProcessor(model_dir, "nf4", cache_dir=cache_dir, device="cpu", memory_budget_gb=0.5)
    app, engine = build_app(processor, **app_kwargs)
    served = Served(app, engine, processor)
    try:
        yield served
    finally:
        served.stop()
        processor.close()


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    with serving(tiny_dir, tmp_path_factory.mktemp("cache"), model_name="tiny", api_key=KEY, max_batch_size=8,
                 max_queue=16, kv_budget_bytes=1 << 20) as served:
        yield served


def complete(client, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model="tiny", prompt=prompt, **kwargs)


def streamed_text(stream, chat=False):
    parts, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        parts.append((choice.delta.content if chat else choice.text) or "")
        finish = choice.finish_reason or finish
    return "".join(parts), finish


def test_models_health_and_unknown_routes(tiny):
    assert [m.id for m in tiny.client().models.list()] == ["tiny"]
    status, body = tiny.raw("GET", "/health")  # open without the key, for probes
    assert status == 200 and json.loads(body)["engine"]["running"] is True
    status, body = tiny.raw("GET", "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_streamed_and_whole_answers_agree(tiny, tiny_dir):
    client = tiny.client()
    whole = complete(client, "Hello there")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    text, finish = streamed_text(complete(client, "Hello there", stream=True))
    assert (text, finish) == (whole.choices[0].text, "length")

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    assert streamed_text(stream, chat=True) == (chat.choices[0].message.content, chat.choices[0].finish_reason)
    # The synthetic tokenizer has no chat template: the plain "role: content" lines, then "assistant:".
    tok = tiny.engine.tokenizer
    assert not tok.chat_template
    assert build_chat_prompt(tok, messages) == tok("system: Be brief.\nuser: hi\nassistant:")["input_ids"]
    assert chat.usage.prompt_tokens == len(build_chat_prompt(tok, messages))


def test_concurrent_clients_share_a_pass_and_each_get_their_lone_answer(tiny):
    prompts = ["Hello world", "The quick brown fox", "abc", "Once upon a time", "42", "zz top"]
    tiny.engine.eos_token_ids, eos = [], tiny.engine.eos_token_ids  # all run 16 tokens: none leaves early
    lone = [complete(tiny.client(), p, max_tokens=16).choices[0].text for p in prompts]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = complete(tiny.client(), prompts[i], max_tokens=16).choices[0].text

    with gated(tiny.processor) as gate:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        # the first requests run (held at the gate), the others wait: the next step admits them all
        until(lambda: queued(tiny.engine) == len(prompts), what="the requests to queue up")
        gate.set()
        for t in threads:
            t.join(60)
    tiny.engine.eos_token_ids = eos
    assert results == lone
    assert tiny.engine.stats()["peak_batch"] == len(prompts)


def test_seeded_sampling_repeats_and_stop_strings_cut(tiny):
    client = tiny.client()
    a, b = (complete(client, "Sample me", temperature=1.0, top_p=0.9, seed=7, max_tokens=20).choices[0].text
            for _ in range(2))
    assert a == b
    greedy = complete(client, "Hello there", max_tokens=24).choices[0].text
    ascii_at = [i for i, c in enumerate(greedy) if i >= 2 and c.isascii() and c.isprintable()]
    assert ascii_at, f"no ASCII character to stop at in {greedy!r}"
    stop = greedy[ascii_at[0]]
    cut = complete(client, "Hello there", max_tokens=24, stop=[stop, "never-seen"])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    text, finish = streamed_text(complete(client, "Hello there", max_tokens=24, stop=stop, stream=True))
    assert (text, finish) == (greedy[:greedy.index(stop)], "stop")


def test_a_client_that_leaves_is_dropped_and_the_server_keeps_serving(tiny):
    engine = tiny.engine
    before = engine.stats().get("finished_cancelled", 0)
    with slowed(tiny.processor, 0.1):  # 100 steps: ~10 s, far longer than reading two chunks (even on a loaded CPU)
        stream = complete(tiny.client(), "Tell me a long story", max_tokens=100, stream=True,
                          extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()  # the connection goes away mid-stream
        until(lambda: engine.stats().get("finished_cancelled", 0) == before + 1 and engine.stats()["active"] == 0,
              20, "the engine to drop the stream")
        # a non-streamed request whose client gives up is dropped too
        conn = http.client.HTTPConnection("127.0.0.1", tiny.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 100,
                                                                   "temperature": 0, "ignore_eos": True}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        until(lambda: engine.stats()["active"] == 1, 10, "the request to start")
        conn.close()
        until(lambda: engine.stats().get("finished_cancelled", 0) == before + 2 and engine.stats()["active"] == 0,
              20, "the engine to drop the abandoned request")
    assert complete(tiny.client(), "still there?", max_tokens=3).choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors_and_the_server_survives(tiny):
    client = tiny.client()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, text = tiny.raw("POST", "/v1/chat/completions", body, auth)
        assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:  # 128 positions in the tiny model
        client.completions.create(model="tiny", prompt="x" * 200, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded" and "128" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=500)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    for bad in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2}, {"stop": [1]}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="hi", **{"max_tokens": 4, **bad})
    with pytest.raises(openai.AuthenticationError):
        tiny.client(api_key="wrong").models.list()
    status, text = tiny.raw("POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi"}')
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert complete(client, "still alive", max_tokens=2).usage.completion_tokens == 2


def test_a_failing_step_fails_its_requests_not_the_server(tiny):
    def broken(items):
        raise RuntimeError("disk on fire")

    tiny.processor.step_many = broken
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            complete(tiny.client(), "hi", max_tokens=3)
        assert "disk on fire" in caught.value.body["message"]
    finally:
        del tiny.processor.step_many
    assert tiny.engine.running and complete(tiny.client(), "hi", max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429(tiny_dir, tmp_path):
    with serving(tiny_dir, tmp_path / "cache", model_name="tiny", max_batch_size=1, max_queue=1) as served:
        client = served.client(api_key="unused")
        answers = []
        with gated(served.processor) as gate:
            threads = [threading.Thread(target=lambda: answers.append(complete(client, "hold", max_tokens=3)))
                       for _ in range(2)]
            threads[0].start()
            until(lambda: served.engine.stats()["active"] == 1, what="the first request to run")
            threads[1].start()
            until(lambda: served.engine.stats()["waiting"] == 1, what="the second request to wait")
            with pytest.raises(openai.RateLimitError) as caught:
                complete(client, "one too many", max_tokens=3)
            assert caught.value.response.headers["retry-after"] == "1"
            assert caught.value.body["code"] == "rate_limit_exceeded"
            gate.set()
            for t in threads:
                t.join(30)
        assert [a.choices[0].finish_reason for a in answers] == ["length", "length"]
        assert served.engine.stats()["peak_batch"] == 1


def test_admission_waits_for_kv_memory(tiny_dir, tmp_path):
    from sli.engine import BatchingEngine, Request, RequestTooLarge

    processor = UniversalSLIProcessor(tiny_dir, "int8", cache_dir=tmp_path / "cache", device="cpu")
    per_token = processor.kv_bytes(1)
    with processor, BatchingEngine(processor, max_batch_size=8, kv_budget_bytes=100 * per_token,
                                   eos_token_ids=[]) as engine:
        with pytest.raises(RequestTooLarge):
            engine.submit(Request([5] * 90, max_tokens=20, temperature=0))
        requests = [engine.submit(Request([5 + i] * 10, max_tokens=20, temperature=0)) for i in range(5)]
        for request in requests:
            assert [e.finish_reason for e in request.events(timeout=30)][-1] == "length"
        stats = engine.stats()
    # 30 positions each: three fit in 100 at a time, the others waited for memory
    assert stats["peak_batch"] == 3 and stats["peak_kv_bytes"] == 90 * per_token <= stats["kv_budget_bytes"]
    assert stats["kv_bytes_active"] == 0 and stats["admitted"] == 5


def test_sli_serve_command_serves_until_interrupted(tiny_dir, tmp_path):
    from sli.cli import main

    assert main(["serve", str(tiny_dir), "--port", "0"]) == 2  # a usage error, before loading anything
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from sli.cli import main; sys.exit(main(sys.argv[1:]))", "serve",
               str(tiny_dir), "--port", str(port), "--memory-budget-gb", "0.5", "--cache-dir", str(tmp_path / "c"),
               "--model-name", "tiny", "--json", "-q"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, SLI_API_KEY=KEY))
    try:
        ready = json.loads(server.stdout.readline())
        assert ready["url"] == f"http://127.0.0.1:{port}/v1" and ready["model"] == "tiny"
        def healthy():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:  # the JSON line comes just before uvicorn listens
                return False

        until(healthy, 120, "sli serve to listen")
        # the first token compiles the kernels when their cache is cold: minutes on a loaded machine
        client = openai.OpenAI(base_url=ready["url"], api_key=KEY, max_retries=0, timeout=300)
        assert complete(client, "hi", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):  # the key came from $SLI_API_KEY
            openai.OpenAI(base_url=ready["url"], api_key="wrong", max_retries=0).models.list()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, server.stderr.read()


def test_default_model_answers_16_concurrent_chat_clients_like_lone_ones(tmp_path):
    from sli.default_model import ensure_default_model

    model_dir = ensure_default_model(progress=False)
    processor = UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "cache", device="cpu")
    app, engine = build_app(processor, max_batch_size=16, max_queue=16)
    served = Served(app, engine, processor)
    try:
        name = model_dir.name
        questions = ["What is the capital of France?", "What is 2+2?"]

        def ask(question):
            answer = served.client().chat.completions.create(
                model=name, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0)
            return answer.choices[0].message.content

        lone = {q: ask(q) for q in questions}
        assert "Paris" in lone[questions[0]]
        results = [None] * 16

        def client(i):
            results[i] = ask(questions[i % 2])

        with gated(processor) as gate:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            until(lambda: queued(engine) == 16, 60, "16 clients to arrive")
            gate.set()
            for t in threads:
                t.join(120)
        assert results == [lone[questions[i % 2]] for i in range(16)]
        assert engine.stats()["peak_batch"] == 16
    finally:
        served.stop()
        processor.close()


# ---------------------------------------------------------------- sampling fields and stop strings


@contextlib.contextmanager
def recorded(processor):
    """Each step's (fed ids, last logits) of the one sequence running."""
    steps, real = [], processor.step_many

    def step_many(items):
        logits = real(items)
        steps.append((items[0][0][0].tolist(), logits[0][0].float().clone()))
        return logits

    processor.step_many = step_many
    try:
        yield steps
    finally:
        del processor.step_many


def _chosen(steps):
    """The tokens the steps chose: each step feeds the one chosen before it (the last is not fed)."""
    return [fed[0] for fed, _ in steps[1:]]


def test_penalties_act_on_each_step_as_transformers_and_openai_define_them(tiny):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompt = tiny.engine.tokenizer("Hello there")["input_ids"]
    changed = 0
    with recorded(tiny.processor) as steps:
        complete(tiny.client(), "Hello there", max_tokens=16, extra_body={"repetition_penalty": 1.8, "ignore_eos": True})
    chosen = _chosen(steps)
    assert len(steps) == 16
    for t, token in enumerate(chosen):  # the CTRL rule over the prompt and the answer so far
        logits = steps[t][1].view(1, -1)
        context = torch.tensor([prompt + chosen[:t]])
        assert token == int(RepetitionPenaltyLogitsProcessor(1.8)(context, logits.clone()).argmax())
        changed += token != int(logits.argmax())
    assert changed, "the penalty never changed a choice: the test shows nothing"
    with recorded(tiny.processor) as steps:
        complete(tiny.client(), "Hello there", max_tokens=16, frequency_penalty=1.5, presence_penalty=0.5,
                 extra_body={"ignore_eos": True})
    chosen, changed = _chosen(steps), 0
    for t, token in enumerate(chosen):  # OpenAI's: the answer's tokens only, by count and by presence
        logits = steps[t][1]
        counts = torch.bincount(torch.tensor(chosen[:t], dtype=torch.long), minlength=logits.numel()).float()
        assert token == int((logits - counts * 1.5 - (counts > 0).float() * 0.5).argmax())
        changed += token != int(logits.argmax())
    assert changed


def test_min_p_one_samples_the_greedy_answer(tiny):
    client = tiny.client()
    greedy = complete(client, "Hello there", max_tokens=16).choices[0].text
    sampled = complete(client, "Hello there", max_tokens=16, temperature=1.0, seed=11, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == greedy
    other = complete(client, "Hello there", max_tokens=16, temperature=1.0, seed=11, extra_body={"min_p": 0.0})
    assert other.choices[0].text != greedy  # (min_p 0 is off: this seed samples another answer)


def _pair_in(text):
    for i in range(2, len(text) - 1):
        if text[i:i + 2].isascii() and text[i:i + 2].isprintable():
            return text[i:i + 2], text.index(text[i:i + 2])
    raise AssertionError(f"no two printable ASCII characters in a row to stop at in {text!r}")


def test_a_stream_never_shows_part_of_a_stop_string(tiny):
    client = tiny.client()
    whole = complete(client, "Once upon a time", max_tokens=32, extra_body={"ignore_eos": True})
    greedy = whole.choices[0].text
    stop, at = _pair_in(greedy)
    cut = complete(client, "Once upon a time", max_tokens=32, stop=[stop, "zz-never"])
    assert cut.choices[0].text == greedy[:at] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < whole.usage.completion_tokens  # the answer ended there
    pieces = [chunk.choices[0].text for chunk in complete(client, "Once upon a time", max_tokens=32, stream=True,
                                                          stop=stop) if chunk.choices]
    assert "".join(pieces) == greedy[:at]  # chunks only add text: a partial stop string would still be there
    # the start of a stop string that never comes is held back, then sent (here: at max_tokens)
    text, finish = streamed_text(complete(client, "Once upon a time", max_tokens=32, stream=True,
                                          stop=stop[0] + "\x01never", extra_body={"ignore_eos": True}))
    assert (text, finish) == (greedy, "length")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Once"}],
                                          max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    answer = chat.choices[0].message.content
    stop, at = _pair_in(answer)
    streamed = streamed_text(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Once"}], max_tokens=32, temperature=0, stop=[stop],
        stream=True), chat=True)
    assert streamed == (answer[:at], "stop")


@pytest.mark.parametrize("fields, param, says", [
    ({"min_p": 1.5}, "min_p", "'min_p' is 1.5; it must be in [0, 1]"),
    ({"min_p": -0.1}, "min_p", "it must be in [0, 1]"),
    ({"min_p": "high"}, "min_p", "'min_p' must be a finite number"),
    ({"repetition_penalty": 0}, "repetition_penalty", "'repetition_penalty' is 0; it must be > 0"),
    ({"repetition_penalty": -1.1}, "repetition_penalty", "it must be > 0"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "'frequency_penalty' is 2.5; it must be in [-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty", "it must be in [-2, 2]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "a list of at most 4 strings"),
    ({"stop": 3}, "stop", "'stop' must be a string"),
])
def test_sampling_fields_out_of_range_are_a_400_naming_the_field(tiny, fields, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        tiny.client().completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body=fields)
    error = caught.value.body
    assert error["param"] == param and says in error["message"] and "\n" not in error["message"]


def test_a_nan_sampling_field_is_a_400(tiny):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for name in ("temperature", "min_p", "repetition_penalty"):
        status, text = tiny.raw("POST", "/v1/completions", f'{{"model": "tiny", "prompt": "hi", "{name}": NaN}}', auth)
        assert status == 400 and json.loads(text)["error"]["param"] == name
