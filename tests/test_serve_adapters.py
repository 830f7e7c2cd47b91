"""Several LoRA adapters over one base in one `cpuft serve`: routing by `model`, mixed batches
without cross-talk, the start-up refusals, and loading/unloading adapters on the live server.

Two adapters are trained here with the real `cpuft sft` CLI on the same tiny base, on different
data (random chat rows of two seeds) at a high learning rate, so that they answer differently;
each server reply must equal `cpuft generate --model RUN` (greedy, fp32, unmerged like the
server's adapters) on that reply's own run. Spoken to with the official `openai` client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import random_chat_rows, run_cpuft, start_serve, write_jsonl

API_KEY = "adapters-key"
PROMPTS = ["Question 3: cpu core thread?", "Question 7: cache memory loss rank?"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("adapter-runs")

    def train(name: str, seed: int):
        data = write_jsonl(root / f"{name}.jsonl", random_chat_rows(seed, question_words=6, answer_words=10, count=32))
        result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", data, "--max-steps", "8", "--learning-rate", "1e-2",
                           "--per-device-batch-size", "8", "--gradient-accumulation-steps", "1", "--eval-fraction", "0",
                           "--output-dir", root / name, "--no-progress")
        assert result.returncode == 0, result.stderr[-3000:]
        return root / name

    with ThreadPoolExecutor(2) as pool:
        run_a, run_b = pool.map(train, ["run_a", "run_b"], [1, 2])
    return {"run_a": run_a, "run_b": run_b}


@pytest.fixture(scope="module")
def expected(runs) -> dict[tuple[str, str], str]:
    """`cpuft generate`'s greedy reply of each run to each prompt."""
    def generate(key):
        run, prompt = key
        result = run_cpuft("generate", "--model", runs[run], "--dtype", "fp32", "--max-new-tokens", str(MAX_TOKENS), prompt)
        assert result.returncode == 0, result.stderr[-3000:]
        return key, result.stdout.removesuffix("\n")

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(generate, [(run, prompt) for run in runs for prompt in PROMPTS]))


def start_server(*args) -> tuple[subprocess.Popen, str, list[str]]:
    return start_serve(*args, "--dtype", "fp32")


@pytest.fixture(scope="module")
def server(runs, expected):
    # run_a under a chosen name, run_b under its run directory's name.
    process, url, _ = start_server(f"alpha={runs['run_a']}", runs["run_b"] / "adapter", "--api-key", API_KEY,
                                     "--max-batch-size", "4", "--max-queue", "16")
    yield url
    process.terminate()
    process.wait(timeout=30)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def chat(url: str, model: str, prompt: str, **kwargs) -> str:
    reply = client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=MAX_TOKENS, **kwargs)
    if kwargs.get("stream"):
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    return reply.choices[0].message.content


def post(url: str, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=300)


SERVED = {"alpha": "run_a", "run_b": "run_b"}


def test_each_adapter_answers_as_cpuft_generate_on_its_own_run(server, expected):
    assert sorted(m.id for m in client(server).models.list()) == ["alpha", "run_b"]
    # The two fine-tunes must answer differently, else "no cross-talk" would prove nothing.
    assert any(expected[("run_a", p)] != expected[("run_b", p)] for p in PROMPTS), expected
    for name, run in SERVED.items():
        for prompt in PROMPTS:
            assert chat(server, name, prompt) == expected[(run, prompt)], (name, prompt)
            assert chat(server, name, prompt, stream=True) == expected[(run, prompt)], (name, prompt)


def test_interleaved_concurrent_requests_share_batches_without_cross_talk(server, expected):
    before = httpx.get(f"{server}/health").json()
    jobs = [(name, prompt, stream) for name in SERVED for prompt in PROMPTS for stream in (False, True)] * 2
    start = threading.Barrier(len(jobs))

    def ask(job):
        name, prompt, stream = job
        start.wait()
        return job, chat(server, name, prompt, stream=stream)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, _), answer in answers:
        assert answer == expected[(SERVED[name], prompt)], (name, prompt)
    after = httpx.get(f"{server}/health").json()
    assert after["completed"] - before["completed"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # requests of both adapters did share batches


def test_an_unknown_model_is_a_404_in_openais_shape(server):
    response = post(server, "/v1/chat/completions", {"model": "run_c", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found"
    assert "'alpha'" in error["message"] and "'run_b'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="run_c", prompt="hi", max_tokens=2)


def test_adapters_load_and_unload_on_the_live_server(server, runs, expected):
    prompt = PROMPTS[0]
    # Bad requests first: the server must refuse them and keep serving.
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400  # lora_path missing
    taken = post(server, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(runs["run_b"])})
    assert taken.status_code == 400 and "already served" in taken.json()["error"]["message"]
    nowhere = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/adapter"})
    assert nowhere.status_code == 400 and "does not exist" in nowhere.json()["error"]["message"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "nobody"}).status_code == 404
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(runs["run_a"])}, key="wrong").status_code == 401

    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": str(runs["run_b"])})
    assert loaded.status_code == 200, loaded.text
    assert "beta" in [m.id for m in client(server).models.list()]
    assert chat(server, "beta", prompt) == expected[("run_b", prompt)]

    # A long streamed request on beta is in flight when beta is unloaded: it must finish whole,
    # and the unload must answer only after it.
    events: list[tuple[str, float]] = []
    stream = client(server).chat.completions.create(
        model="beta", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=200, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # the request is running
    assert first.choices[0].delta.role == "assistant"
    unloading = threading.Thread(target=lambda: events.append(
        ("unloaded", post(server, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code, time.monotonic())))
    unloading.start()
    chunks = list(stream)
    events.append(("stream ended", chunks[-1].usage.completion_tokens, time.monotonic()))
    unloading.join(timeout=300)
    finished = {name: value for name, value, _ in events}
    assert finished == {"stream ended": 200, "unloaded": 200}  # all 200 tokens generated; unload succeeded
    assert [name for name, _, _ in sorted(events, key=lambda e: e[2])] == ["stream ended", "unloaded"]

    assert "beta" not in [m.id for m in client(server).models.list()]
    gone = post(server, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 404
    assert chat(server, "alpha", prompt) == expected[("run_a", prompt)]  # the others are untouched
    assert chat(server, "run_b", prompt) == expected[("run_b", prompt)]


def test_adapter_loading_needs_an_api_key(runs):
    process, url, _ = start_server(f"alpha={runs['run_a']}")
    try:
        response = post(url, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": str(runs["run_b"])}, key=None)
        assert response.status_code == 403
        assert "--api-key" in response.json()["error"]["message"]
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, key=None).status_code == 403
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["alpha"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_adapters_of_different_bases_are_refused_at_start_with_exit_2(runs, tiny_model_dir, tmp_path):
    other_base = shutil.copytree(tiny_model_dir, tmp_path / "other-base")
    foreign = shutil.copytree(runs["run_b"] / "adapter", tmp_path / "foreign")
    config_path = foreign / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(other_base)
    config_path.write_text(json.dumps(config))
    result = run_cpuft("serve", runs["run_a"], f"foreign={foreign}", "--port", "0", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(other_base) in result.stderr and str(tiny_model_dir) in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cpuft("serve", f"x={runs['run_a']}", f"x={runs['run_b']}", "--port", "0", timeout=120)
    assert result.returncode == 2 and "two adapters would be served as 'x'" in result.stderr
    result = run_cpuft("serve", runs["run_a"], tiny_model_dir, "--port", "0", timeout=120)
    assert result.returncode == 2 and "is a full model, not an adapter" in result.stderr
