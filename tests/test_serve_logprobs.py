"""`cpuft serve`'s logprobs, top_logprobs, echo and penalties, checked against the model itself.

The server (the real CLI in a subprocess, in the dtype this CPU's plan picks, bf16 or fp32, passed
explicitly: `--dtype auto` measures and may pick int8, tests/test_serve_precision.py) serves `qa_run_dir` (base + LoRA, merged at load). The reference is stock transformers +
PEFT: the base, `PeftModel.from_pretrained` with the run's adapter, unmerged, fp32, one forward
over the prompt and the server's reply; its log-softmax must equal what the server reported, to
the tolerance of the server's dtype (conftest.DTYPE_TOLERANCE). Spoken to with the official
`openai` client, and with httpx for the request shapes lm-evaluation-harness sends.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import DTYPE_TOLERANCE, start_serve

PROMPT = "What is the capital of Peru?"


@pytest.fixture(scope="module")
def server(qa_run_dir):
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    planned = plan_for(probe_machine(), PlanRequest(device="cpu")).compute_dtype
    process, url, _ = start_serve(qa_run_dir, "--served-model-name", "qa", "--dtype", planned)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tolerance(server) -> float:
    precision = httpx.get(f"{server}/health", timeout=10).json()["precision"]
    return DTYPE_TOLERANCE[precision]


@pytest.fixture(scope="module")
def reference(qa_run_dir):
    """(tokenizer, ids -> [len(ids), vocab] log-softmax) from stock transformers + PEFT, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qa_run_dir / "adapter")
    base_path = __import__("json").loads((qa_run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), qa_run_dir / "adapter").eval()

    def log_softmax(ids: list[int]):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return tokenizer, log_softmax


def ids_of(tokenizer, tokens: list) -> list[int]:
    """The server reports tokens as text (completions) or with their bytes (chat); map each back to
    its id: a chat entry by its bytes (text alone is U+FFFD for a token holding part of a
    character), a completions token by its text (unique in this vocabulary for the tokens used)."""
    from transformers.convert_slow_tokenizer import (
        bytes_to_unicode,  # the test tokenizer is byte-level BPE
    )

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    by_key: dict = {}
    for i in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(i)
        by_key.setdefault(tokenizer.decode([i]), []).append(i)
        if i in tokenizer.all_special_ids:  # special tokens are not byte-level pieces: their bytes are their text's
            by_key.setdefault(tuple(tokenizer.decode([i]).encode()), []).append(i)
        elif all(c in byte_of for c in piece):
            by_key.setdefault(tuple(byte_of[c] for c in piece), []).append(i)
    ids = []
    for token in tokens:
        key = tuple(token.bytes) if hasattr(token, "bytes") else token
        assert len(by_key.get(key, [])) == 1, (token, by_key.get(key))
        ids.append(by_key[key][0])
    return ids


def assert_top_matches(top: list[float], row, tolerance: float) -> None:
    expected = row.topk(len(top)).values.tolist()
    assert sorted(top, reverse=True) == pytest.approx(expected, abs=tolerance)


def test_chat_logprobs_are_the_log_softmax_of_the_models_logits(client, reference, tolerance):
    tokenizer, log_softmax = reference
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="qa", messages=messages, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    assert len(content) == reply.usage.completion_tokens == 8
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    generated = ids_of(tokenizer, content)
    expected = log_softmax(prompt + generated)
    for j, entry in enumerate(content):
        row = expected[len(prompt) + j - 1]
        assert entry.logprob == pytest.approx(float(row[generated[j]]), abs=tolerance)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or "\ufffd" in entry.token
        assert len(entry.top_logprobs) == 3
        assert_top_matches([t.logprob for t in entry.top_logprobs], row, tolerance)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=tolerance)  # greedy: the chosen is the likeliest

    streamed = client.chat.completions.create(model="qa", messages=messages, temperature=0, max_tokens=8, stream=True,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    pieces = [entry for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]

    plain = client.chat.completions.create(model="qa", messages=messages, temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_echo_score_the_prompt(client, reference, tolerance, server):
    tokenizer, log_softmax = reference
    prompt_text = "What is 3 plus 4?"
    prompt = tokenizer(prompt_text)["input_ids"]
    reply = client.completions.create(model="qa", prompt=prompt_text, max_tokens=5, temperature=0, logprobs=2,
                                      echo=True, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt_text)
    assert len(logprobs.tokens) == len(prompt) + 5 == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first token
    ids = ids_of(tokenizer, logprobs.tokens)
    assert ids[:len(prompt)] == prompt
    expected = log_softmax(ids)
    for i in range(1, len(ids)):
        row = expected[i - 1]
        assert logprobs.token_logprobs[i] == pytest.approx(float(row[ids[i]]), abs=tolerance)
        assert_top_matches(list(logprobs.top_logprobs[i].values()), row, tolerance)
    # text_offset: where each token starts in the returned text
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        assert choice.text[offset:offset + len(token)] == token

    # What lm-evaluation-harness's local-completions sends for a loglikelihood request: token ids,
    # echo, max_tokens 1 (or 0), logprobs 1; it sums token_logprobs[ctxlen:-1].
    for max_tokens in (0, 1):
        body = {"model": "qa", "prompt": [prompt], "max_tokens": max_tokens, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
        response = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        scored = response.json()["choices"][0]["logprobs"]
        assert len(scored["token_logprobs"]) == len(prompt) + max_tokens
        assert scored["token_logprobs"][0] is None
        assert scored["token_logprobs"][1:len(prompt)] == pytest.approx(
            [float(expected[i - 1][prompt[i]]) for i in range(1, len(prompt))], abs=tolerance)
        assert response.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                                            "total_tokens": len(prompt) + max_tokens}

    no_logprobs = client.completions.create(model="qa", prompt=prompt_text, max_tokens=2, temperature=0, echo=True)
    assert no_logprobs.choices[0].text.startswith(prompt_text) and no_logprobs.choices[0].logprobs is None


def test_penalties_lower_repeated_tokens_and_logprobs_stay_raw(client, reference, tolerance):
    tokenizer, log_softmax = reference
    messages = [{"role": "user", "content": "Tell me about cheese."}]
    common = {"model": "qa", "messages": messages, "temperature": 0, "max_tokens": 24, "logprobs": True, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**common)
    plain_ids = ids_of(tokenizer, plain.choices[0].logprobs.content)
    assert len(set(plain_ids)) < len(plain_ids)  # this barely trained model repeats itself

    # presence 2 (OpenAI's maximum): logits here span a few units, so a token once used stays unused.
    fresh = client.chat.completions.create(**common, presence_penalty=2.0)
    fresh_ids = ids_of(tokenizer, fresh.choices[0].logprobs.content)
    assert len(set(fresh_ids)) == len(fresh_ids) == 24
    # a negative frequency penalty rewards repeating: from its second token on, the reply is one token
    looping = client.chat.completions.create(**common, frequency_penalty=-2.0)
    looping_ids = ids_of(tokenizer, looping.choices[0].logprobs.content)
    assert len(set(looping_ids[1:])) == 1

    # The reported logprobs are the model's, before the penalty changed the choice.
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    expected = log_softmax(prompt + fresh_ids)
    reported = [e.logprob for e in fresh.choices[0].logprobs.content]
    assert reported == pytest.approx([float(expected[len(prompt) + j - 1][t]) for j, t in enumerate(fresh_ids)], abs=tolerance)


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", '"logprobs": true'),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"max_tokens": 0}, "echo", "max_tokens 0 generates nothing"),
    ("/v1/completions", {"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt", "at most 1 item"),
    ("/v1/completions", {"prompt": [[10 ** 6]]}, "prompt", "beyond this model's vocabulary"),
])
def test_bad_logprob_echo_and_penalty_fields_are_a_400_naming_the_field(server, path, body, param, says):
    base = ({"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} if "chat" in path
            else {"model": "qa", "prompt": "hi", "max_tokens": 2})
    response = httpx.post(f"{server}{path}", json={**base, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
