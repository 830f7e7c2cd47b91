"""`cpuft serve` from the outside: the real CLI in a subprocess on 127.0.0.1, a real fine-tune
(`qa_run_dir`, conftest: base + LoRA adapter, merged at load), spoken to with the official
`openai` client, and with httpx for requests no client library would send.

One server for the module (starting one costs seconds): small queue and batch so that the load
test can fill them, and an API key so every request proves the key check lets it through.
After every test the server must still answer /health and still be the same process.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import run_cpuft, start_serve

API_KEY = "test-key-123"
MAX_QUEUE, MAX_BATCH = 4, 4
PROMPT = "What is the capital of Peru?"


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen
    log: list[str]

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        # max_retries=0: the client would otherwise retry a 429 or a 5xx and hide it from the test.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body, headers: dict | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        if isinstance(body, (bytes, str)):
            return httpx.post(f"{self.url}{path}", content=body, headers={"Content-Type": "application/json", **headers}, timeout=120, **kwargs)
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(qa_run_dir, request):
    # --dtype fp32: bf16 (planned on AMX / AVX-512-BF16) can flip a greedy token of this barely
    # trained model between a batch of one and a padded batch; fp32 on both sides keeps the
    # comparisons with `cpuft generate` exact. --port 0: the server picks a free port and says which.
    process, url, log = start_serve(qa_run_dir, "--dtype", "fp32", "--api-key", API_KEY, "--served-model-name", "qa",
                                    "--max-queue", MAX_QUEUE, "--max-batch-size", MAX_BATCH,
                                    # the reference reply is computed while the server loads
                                    while_loading=lambda: request.getfixturevalue("generate_reply"))
    assert url.startswith("http://127.0.0.1:")  # the default bind is loopback only
    running = Server(url, "qa", process, log)
    running.health()
    yield running
    process.terminate()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, so the exit is by that signal.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM), "".join(log)[-3000:]


@pytest.fixture(autouse=True)
def server_stays_healthy(request):
    yield
    if "server" in request.fixturenames:
        running = request.getfixturevalue("server")
        assert running.process.poll() is None, "".join(running.log)[-3000:]
        assert running.health()["status"] == "ok"


@pytest.fixture(scope="module")
def tokenizer(qa_run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qa_run_dir / "adapter")


@pytest.fixture(scope="module")
def generate_reply(qa_run_dir) -> str:
    """`cpuft generate`'s greedy reply to PROMPT, 24 tokens: what the server must answer."""
    result = run_cpuft("generate", "--model", qa_run_dir, "--merge", "--dtype", "fp32", "--max-new-tokens", "24", PROMPT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.removesuffix("\n")


def chat(server: Server, content: str = PROMPT, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 24)
    return server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}], **kwargs)


# ----------------------------------------------------------------------------- the openai client


def test_chat_reply_is_cpuft_generates_reply_with_token_counts(server, generate_reply, tokenizer):
    reply = chat(server)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == generate_reply
    assert reply.model == "qa" and reply.object == "chat.completion"
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 24
    else:  # ended at the end-of-text token, which counts as generated
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_is_the_same_reply_in_pieces(server, generate_reply):
    stream = chat(server, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == generate_reply
    assert len(with_choices) > 3  # it arrived in pieces, not as one
    assert [c.choices[0].finish_reason for c in with_choices][-1] in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage = chunks[-1].usage  # include_usage: one last chunk without choices
    assert not chunks[-1].choices and usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_sequences_cut_the_reply_before_the_stop(server, generate_reply):
    # Stop strings taken from the reply itself; the expected text is everything before the first one.
    middle = len(generate_reply) // 2
    stop = generate_reply[middle:middle + 3]
    expected = generate_reply[: generate_reply.find(stop)]
    reply = chat(server, stop=stop)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 24

    later = generate_reply[-3:]
    earliest = generate_reply[: min(generate_reply.find(later), generate_reply.find(stop))]
    assert chat(server, stop=[later, stop]).choices[0].message.content == earliest

    streamed = chat(server, stop=stop, stream=True)
    pieces = [c.choices[0] for c in streamed if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == expected  # no part of the stop string leaked
    assert pieces[-1].finish_reason == "stop"


def test_completions_models_and_ignore_eos(server, tokenizer):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["qa"]
    assert client.models.retrieve("qa").id == "qa"
    prompt = "What is 3 plus 4?"
    reply = client.completions.create(model="qa", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    streamed = client.completions.create(model="qa", prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_a_seed_reproduces_a_sampled_reply(server):
    first = chat(server, temperature=1.0, seed=11, max_tokens=16).choices[0].message.content
    again = chat(server, temperature=1.0, seed=11, max_tokens=16).choices[0].message.content
    assert first == again
    others = {chat(server, temperature=1.0, seed=seed, max_tokens=16).choices[0].message.content for seed in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters: four seeds, not one reply


def test_the_api_key_is_required(server):
    body = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        response = server.post("/v1/chat/completions", body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


# ----------------------------------------------------------------------------- malformed requests

CHAT = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/chat/completions", b'{"model": "qa", "messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", b"", 400, None, "body is missing"),
    ("/v1/chat/completions", {"model": "qa"}, 400, "messages", "required"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "'user'"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, 400, "temperature", "valid number"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, 400, "stop", "valid string or a valid list"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "n must be 1"),
    ("/v1/chat/completions", {**CHAT, "max_token": 5}, 400, "max_token", "unknown field"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": "qa", "prompt": ["one", "two"]}, 400, "prompt", "at most 1 item"),
    ("/v1/completions", {"model": "qa", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/nowhere", CHAT, 404, None, "no route"),
])
def test_a_malformed_request_gets_a_4xx_in_openais_error_shape(server, path, body, status, param, says):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert says in error["message"]


def test_a_prompt_beyond_the_context_is_a_400_naming_the_limit(server):
    context = server.health()["context_length"]
    long_prompt = " ".join(f"word{i}" for i in range(context))  # each numbered word is more than one token
    response = server.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long_prompt}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in response.json()["error"]["message"]

    response = server.post("/v1/completions", {"model": "qa", "prompt": "short", "max_tokens": context})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert chat(server, max_tokens=2).choices[0].finish_reason in ("length", "stop")  # and the next one is served


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    before = server.health()
    body = {**CHAT, "max_tokens": 1500, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                assert line != "data: [DONE]"
                if events == 4:
                    break  # leaving: the connection closes with the stream unfinished
    deadline = time.monotonic() + 30
    while (health := server.health())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["cancelled"] == before["cancelled"] + 1  # its row was stopped, not run to 1500 tokens
    assert health["generated_tokens"] - before["generated_tokens"] < 1500
    assert chat(server, max_tokens=2).choices[0].finish_reason in ("length", "stop")


# ----------------------------------------------------------------------------- load


def test_sixteen_clients_get_a_correct_answer_or_a_429_and_none_is_lost(server):
    prompts = [PROMPT, "What is the capital of Kenya?", "What is 2 plus 3?", "What is 6 plus 8?", "Tell me about cheese."]
    body = lambda prompt: {"model": "qa", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}  # noqa: E731
    # One at a time first: what each prompt's answer is when it is alone in its batch.
    expected = {p: server.post("/v1/chat/completions", body(p)).json()["choices"][0]["message"]["content"] for p in prompts}
    before = server.health()

    clients, per_client = 16, 3
    outcomes: list[tuple[str, httpx.Response]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            start.wait()  # all at once, so the queue fills
            for k in range(per_client):
                prompt = prompts[(i + k) % len(prompts)]
                response = http.post(f"{server.url}/v1/chat/completions", json=body(prompt))
                with lock:
                    outcomes.append((prompt, response))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == clients * per_client  # every request came back

    statuses = Counter(response.status_code for _, response in outcomes)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= MAX_BATCH, statuses
    for prompt, response in outcomes:
        if response.status_code == 200:  # batched with others, still the answer it gets alone
            assert response.json()["choices"][0]["message"]["content"] == expected[prompt]
        else:
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert response.headers["Retry-After"] == "1"
    after = server.health()
    assert after["completed"] - before["completed"] == statuses[200]
    assert after["rejected"] - before["rejected"] == statuses[429]
    assert after["batches"] - before["batches"] < statuses[200]  # some requests did share a batch
    assert chat(server, max_tokens=2).choices[0].finish_reason in ("length", "stop")


# ----------------------------------------------------------------------------- the command line


def test_bad_flags_and_a_taken_port_exit_2_before_loading(qa_run_dir):
    result = run_cpuft("serve", qa_run_dir, "--max-queue", "0")
    assert result.returncode == 2 and "--max-queue must be at least 1" in result.stderr
    result = run_cpuft("serve", "/no/such/model")
    assert result.returncode == 2 and "does not exist" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run_cpuft("serve", qa_run_dir, "--port", str(taken.getsockname()[1]), timeout=60)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr


def test_help_says_how_to_reach_it_through_an_ssh_tunnel():
    result = run_cpuft("serve", "--help")
    assert result.returncode == 0
    assert "gcloud compute ssh VM --zone ZONE --tunnel-through-iap -- -L 8000:127.0.0.1:8000" in result.stdout
    assert "listens on 127.0.0.1 only" in result.stdout


def test_serve_and_generate_share_one_set_of_model_flags():
    """One definition (cli/infer.add_model_arguments): serve takes MODEL positionally and has no
    --merge (it always merges); generate takes --model; the other model flags read the same."""
    from cpuft.cli import build_parser

    parser = build_parser()
    serve_args = parser.parse_args(["serve", "runs/x", "--int8-method", "torch-dynamic", "--threads", "3"])
    generate_args = parser.parse_args(["generate", "--model", "runs/x", "--int8-method", "torch-dynamic", "--threads", "3", "hi"])
    for name in ("model", "base", "device", "dtype", "int8", "int8_method", "nf4", "threads"):
        assert getattr(serve_args, name) == getattr(generate_args, name), name
    assert not hasattr(serve_args, "merge") and generate_args.merge is False

    serve_help, generate_help = run_cpuft("serve", "--help").stdout, run_cpuft("generate", "--help").stdout
    assert "usage: cpuft serve [-h]" in serve_help and " MODEL\n" in serve_help.split("\n\n")[0] + "\n"
    assert "--merge" not in serve_help and "--model" not in serve_help
    assert "--model MODEL" in generate_help and "--merge" in generate_help
    for flag in ("--base", "--device", "--dtype", "--int8-method METHOD", "--nf4", "--threads"):
        assert flag in serve_help and flag in generate_help, flag
