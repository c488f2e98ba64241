"""The OpenAI-compatible API, the generate extension, /infer and metrics on a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from tests.llm_support import build_llm_repository  # noqa: E402
from tests.support import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = build_llm_repository(tmp_path_factory.mktemp("llm_repository"))
    process = ServerProcess(repository, "--no-strict-readiness",
                            log_path=tmp_path_factory.mktemp("llm_logs") / "server.log")
    yield process
    process.stop()


@pytest.fixture
def client(llm_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.metrics_url, timeout=10).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in wanted):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_lists_generation_and_embedding_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["tiny", "tiny_embed", "tiny_small_queue"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("mlp")


def test_completion_greedy_usage_and_determinism(client: openai.OpenAI) -> None:
    first = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    second = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = first.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12
    assert second.choices[0].text == choice.text
    # the default max_tokens comes from the model's parameters (default_max_tokens: 8)
    default = client.completions.create(model="tiny", prompt="Hello world", temperature=0,
                                        extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 8
    assert choice.text.startswith(default.choices[0].text)


def test_completion_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt="The quick brown fox", max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_completion_batch_of_prompts_and_logprobs(client: openai.OpenAI) -> None:
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
              for p in ("Hello", "Now is better than never")]
    both = client.completions.create(model="tiny", prompt=["Hello", "Now is better than never"], max_tokens=6,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == single
    logprobs = both.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert both.usage.completion_tokens == 12


def test_chat_completion_uses_the_chat_template(client: openai.OpenAI, llm_server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # the same tokens as a completion of the rendered template
    rendered = "<|system|>\nYou are terse.</s>\n<|user|>\nHello there</s>\n<|assistant|>\n"
    raw = httpx.post(llm_server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": rendered, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert raw.json()["choices"][0]["text"] == choice.message.content
    assert response.usage.prompt_tokens == raw.json()["usage"]["prompt_tokens"]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(llm_server: ServerProcess) -> None:
    with httpx.stream("POST", llm_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"


def test_async_client_concurrent_streams(llm_server: ServerProcess) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            stream = await client.completions.create(model="tiny", prompt=f"Number {i} is", max_tokens=10 + i,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])

        async def alone(i: int) -> str:
            response = await client.completions.create(model="tiny", prompt=f"Number {i} is", max_tokens=10 + i,
                                                       temperature=0, extra_body={"ignore_eos": True})
            return response.choices[0].text

        together = await asyncio.gather(*(one(i) for i in range(6)))
        solo = [await alone(i) for i in range(6)]
        await client.close()
        assert together == solo
        return together

    assert len(asyncio.run(main())) == 6


def test_openai_errors(client: openai.OpenAI, llm_server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt="x", **extra)
        assert caught.value.body["param"] == param, caught.value.body
        assert caught.value.body["type"] == "invalid_request_error"
        assert param in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="word " * 300)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="not a generation model"):
        client.completions.create(model="tiny_embed", prompt="x")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    response = httpx.post(llm_server.url + "/v1/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = httpx.post(llm_server.url + "/v1/completions", json={"model": "tiny"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_queue_full_answers_429_with_retry_after(llm_server: ServerProcess) -> None:
    """tiny_small_queue: one slot, one waiting place. Two long streams fill both; the third is refused."""
    body = {"model": "tiny_small_queue", "prompt": "Hello", "max_tokens": 16000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=llm_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()  # (kept: a collected iterator closes the connection)
            next(first_lines)  # the first is running
            with http.stream("POST", "/v1/completions", json=body) as second:
                assert second.status_code == 200
                third = httpx.post(llm_server.url + "/v1/completions", timeout=30,
                                   json={**body, "stream": False, "max_tokens": 2})
                assert third.status_code == 429
                assert int(third.headers["retry-after"]) >= 1
                assert third.json()["error"]["type"] == "rate_limit_error"
                generate = httpx.post(llm_server.url + "/v2/models/tiny_small_queue/generate", timeout=30,
                                      json={"text_input": "x", "parameters": {"max_tokens": 2}})
                assert generate.status_code == 429 and "max_waiting_requests" in generate.json()["error"]
    # both streams were closed early: their requests are aborted and the slot comes back
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(llm_server, "inferstack_llm_kv_slots_used", model="tiny_small_queue") == 0 and \
                metric(llm_server, "inferstack_llm_num_requests_waiting", model="tiny_small_queue") == 0:
            break
        time.sleep(0.1)
    assert metric(llm_server, "inferstack_llm_kv_slots_used", model="tiny_small_queue") == 0
    assert metric(llm_server, "inferstack_llm_requests_finished_total", model="tiny_small_queue",
                  reason="abort") >= 2
    ok = httpx.post(llm_server.url + "/v1/completions", timeout=30,
                    json={**body, "stream": False, "max_tokens": 2})
    assert ok.status_code == 200


def test_generate_extension(llm_server: ServerProcess, client: openai.OpenAI) -> None:
    expected = client.completions.create(model="tiny", prompt="Hello world", max_tokens=7, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    response = httpx.post(llm_server.url + "/v2/models/tiny/generate", timeout=60, json={
        "text_input": "Hello world", "parameters": {"max_tokens": 7, "temperature": 0, "ignore_eos": True}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text_output"] == expected and body["model_name"] == "tiny" and body["model_version"] == "1"
    assert body["completion_tokens"] == 7
    versioned = httpx.post(llm_server.url + "/v2/models/tiny/versions/1/generate", timeout=60, json={
        "text_input": "Hello world", "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    assert versioned.json()["text_output"] == expected
    with httpx.stream("POST", llm_server.url + "/v2/models/tiny/generate_stream", timeout=60, json={
            "text_input": "Hello world", "parameters": {"max_tokens": 7, "temperature": 0, "ignore_eos": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "length"
    bad = httpx.post(llm_server.url + "/v2/models/tiny/generate", timeout=30, json={"text_input": 5})
    assert bad.status_code == 400 and "text_input" in bad.json()["error"]
    bad = httpx.post(llm_server.url + "/v2/models/tiny/generate", timeout=30,
                     json={"text_input": "x", "parameters": {"temprature": 1}})
    assert bad.status_code == 400 and "temprature" in bad.json()["error"]
    missing = httpx.post(llm_server.url + "/v2/models/nope/generate", timeout=30, json={"text_input": "x"})
    assert missing.status_code == 404


def test_infer_with_text_input(llm_server: ServerProcess, client: openai.OpenAI) -> None:
    expected = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    params = json.dumps({"max_tokens": 5, "temperature": 0, "ignore_eos": True})
    response = httpx.post(llm_server.url + "/v2/models/tiny/infer", timeout=60, json={"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [2, 1], "data": ["Hello world", "Hello world"]},
        {"name": "sampling_parameters", "datatype": "BYTES", "shape": [2, 1], "data": [params, params]},
    ]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [expected, expected]
    wrong = httpx.post(llm_server.url + "/v2/models/tiny/infer", timeout=60, json={"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]})
    assert wrong.status_code == 400 and "text_input" in wrong.json()["error"]


def test_embeddings(client: openai.OpenAI, llm_server: ServerProcess) -> None:
    response = client.embeddings.create(model="tiny_embed", input=["hello world", "the quick brown fox", "x"])
    vectors = np.array([d.embedding for d in response.data])
    assert vectors.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens > 3
    one = client.embeddings.create(model="tiny_embed", input="hello world")
    assert np.allclose(one.data[0].embedding, vectors[0], atol=1e-5)
    # more inputs than max_batch_size (16) are split and reassembled in order
    many = client.embeddings.create(model="tiny_embed", input=[f"sentence {i}" for i in range(40)])
    assert [d.index for d in many.data] == list(range(40))
    again = client.embeddings.create(model="tiny_embed", input=["sentence 37"])
    assert np.allclose(many.data[37].embedding, again.data[0].embedding, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="tiny_embed", input=[])


def test_vllm_backend_without_vllm_fails_clearly(llm_server: ServerProcess) -> None:
    index = httpx.post(llm_server.url + "/v2/repository/index", timeout=30).json()
    row = next(r for r in index if r["name"] == "tiny_vllm")
    assert row["state"] == "UNAVAILABLE"
    assert "needs the vllm package" in row["reason"] and 'backend: "transformers"' in row["reason"]


def test_metrics(llm_server: ServerProcess, client: openai.OpenAI) -> None:
    before = metric(llm_server, "inferstack_llm_generation_tokens_total", model="tiny")
    prompt_before = metric(llm_server, "inferstack_llm_prompt_tokens_total", model="tiny")
    response = client.completions.create(model="tiny", prompt="Metrics please", max_tokens=9, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert metric(llm_server, "inferstack_llm_generation_tokens_total", model="tiny") - before == 9
    assert metric(llm_server, "inferstack_llm_prompt_tokens_total", model="tiny") - prompt_before == \
        response.usage.prompt_tokens
    assert metric(llm_server, "inferstack_llm_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(llm_server, "inferstack_llm_inter_token_latency_seconds_count", model="tiny") >= 8
    assert metric(llm_server, "inferstack_llm_kv_slots_total", model="tiny") == 4
    assert metric(llm_server, "inferstack_llm_num_requests_running", model="tiny") == 0
    assert metric(llm_server, "inferstack_llm_num_requests_waiting", model="tiny") == 0
    assert metric(llm_server, "inferstack_http_responses_total", endpoint="completions", code="200") >= 1


def test_grpc_stream_infer_streams_tokens(llm_server: ServerProcess, client: openai.OpenAI) -> None:
    import queue

    import tritonclient.grpc as grpcclient

    expected = client.completions.create(model="tiny", prompt="Hello world", max_tokens=9, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    results: queue.Queue = queue.Queue()
    triton = grpcclient.InferenceServerClient(llm_server.grpc_url)
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        def text_input(text: str) -> list:
            tensor = grpcclient.InferInput("text_input", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            return [tensor]

        sampling = json.dumps({"max_tokens": 9, "temperature": 0, "ignore_eos": True})
        params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([sampling.encode()], dtype=np.object_))
        triton.async_stream_infer("tiny", text_input("Hello world") + [params], request_id="g1")
        pieces = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == "g1"
            pieces.append(result.as_numpy("text_output")[0].decode())
            parameters = result.get_response().parameters
            if parameters["triton_final_response"].bool_param:
                assert parameters["finish_reason"].string_param == "length"
                assert parameters["completion_tokens"].int64_param == 9
                break
        assert len(pieces) > 1 and "".join(pieces) == expected
        # stream=false: one response with the whole text; sampling fields as request parameters
        stream_flag = grpcclient.InferInput("stream", [1], "BOOL")
        stream_flag.set_data_from_numpy(np.array([False]))
        triton.async_stream_infer("tiny", text_input("Hello world") + [stream_flag], request_id="g2",
                                  parameters={"max_tokens": 9, "temperature": 0.0, "ignore_eos": True})
        result, error = results.get(timeout=60)
        assert error is None and result.as_numpy("text_output")[0].decode() == expected
        # a bad sampling parameter is an error response on the stream, which goes on
        triton.async_stream_infer("tiny", text_input("x"), request_id="g3", parameters={"top_p": 7.0})
        result, error = results.get(timeout=60)
        assert error is not None and "top_p" in str(error)
    finally:
        triton.stop_stream()
        triton.close()


def test_non_streaming_client_disconnect_aborts(llm_server: ServerProcess) -> None:
    before = metric(llm_server, "inferstack_llm_requests_finished_total", model="tiny_small_queue", reason="abort")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(llm_server.url + "/v1/completions", timeout=1.0, json={
            "model": "tiny_small_queue", "prompt": "Hello", "max_tokens": 16000, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        aborted = metric(llm_server, "inferstack_llm_requests_finished_total", model="tiny_small_queue",
                         reason="abort")
        if aborted > before and metric(llm_server, "inferstack_llm_kv_slots_used", model="tiny_small_queue") == 0:
            break
        time.sleep(0.1)
    assert aborted == before + 1
    assert metric(llm_server, "inferstack_llm_kv_slots_used", model="tiny_small_queue") == 0


def test_base_server_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, inferstack.server, inferstack.transports.http, inferstack.transports.grpc, "
            "inferstack.observability.metrics, inferstack.backends; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_unload_lets_running_generations_finish(tmp_path: Path, start_server) -> None:
    """Explicit unload of a generation model: a stream already running ends normally, new
    requests are refused, and a reload serves again."""
    from inferstack.testing import llm_models

    llm_models.write_llm_model(tmp_path, "gen", parameters={"max_num_seqs": "2", "max_model_len": "512"})
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "gen")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={
                "model": "gen", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            unloaded = httpx.post(server.url + "/v2/repository/models/gen/unload", timeout=60)
            assert unloaded.status_code == 200
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        after = http.post("/v1/completions", json={"model": "gen", "prompt": "x"})
        assert after.status_code in (404, 503) and after.json()["error"]["message"]
        assert http.post("/v2/repository/models/gen/load").status_code == 200
        again = http.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 3})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
