"""The model's one worker thread: a bounded queue of requests, greedy batches, per-request stops.

torch modules are not re-entrant and two generate() calls on one model in two threads would
only fight over the same cores, so one thread owns the model and everything else talks to it
through `Engine.submit` (from the event loop; raises QueueFull when `max_queue` requests are
already waiting) and the `Job` it returns (an async stream of Delta events, then one Finished or
Failed).

Batching: the worker takes the oldest waiting request; if it is greedy (temperature 0) it also
takes the other greedy requests waiting, up to `max_batch_size`, and runs them as one
left-padded `model.generate`. A sampled request runs alone, so its `seed` reproduces its output
(one torch RNG per batch cannot honour several seeds). Batches are static: a request that
arrives while a batch runs waits for the whole batch to end, and rows that have finished are
still computed (as padding) until the longest row is done.

Each row stops on its own, inside generate, through one StoppingCriteria (`_RowStopper`): at an
end-of-text token (`stop_token_ids`, the set `cpuft generate` stops on; unless `ignore_eos`), when its text contains one of its stop strings (the text
is cut before it), at its own max_tokens, or when its client has gone away (cancelled).
Streaming rows send their new text after every token, holding back a tail that may still turn
into a stop string or that ends in an incomplete UTF-8 character.

Several adapters over one base (`ServedModel.adapter` set): the model is a PeftModel holding
every LoRA adapter unmerged; a batch may mix rows of different adapters and runs as one
`generate(..., adapter_names=[one per row])` (PEFT's mixed-adapter inference: each LoRA layer
applies each adapter to its own rows only). Adapters are loaded and unloaded by the worker itself
between batches (`load_adapter` / `unload_adapter`), so a batch never sees the model change; an
unload waits until no queued or running request uses the adapter.

Logprobs and penalties (`_StepScores`, a LogitsProcessor): per step it keeps the log-softmax of
the logits as the model gave them (before penalties, temperature and top_p: vLLM's default), then
subtracts each row's presence/frequency penalty over that row's generated tokens (OpenAI's
definition: presence * (count > 0) + frequency * count). transformers runs custom processors after
its own default ones (none with the settings used here: repetition_penalty 1, no min length) and
before the sampling warpers (temperature, top_p), so penalties apply before temperature, as in
OpenAI's and vLLM's APIs. Prompt logprobs (echo) take one extra forward over the prompt.

Limits: one model, one batch at a time (no continuous batching, no KV-cache reuse between
requests); prompt/context limits are the caller's to check (app.py).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from cpuft.errors import UserError, first_line
from cpuft.inference.generate import GenerationSettings, stop_token_ids
from cpuft.inference.loading import LoadedModel, device_of


class QueueFull(Exception):
    """`max_queue` requests are already waiting: the caller answers 429."""


class EngineStopped(Exception):
    """The worker is not running (shutting down, or it died): the caller answers 503."""


class AdapterRefused(Exception):
    """A load/unload the server cannot do (name taken or unknown, no adapters mode): the caller answers 4xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    """One id clients may send as `model`."""

    name: str
    tokenizer: Any
    eos_ids: frozenset[int]
    adapter: str | None = None  # the PEFT adapter name inside the model (adapters mode); None: the model as loaded
    source: str = ""  # where it was loaded from, for messages
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob: `top` lists the most likely tokens at that step as (text, logprob,
    bytes) (None for a prompt's first token, which nothing predicts); `offset` is where the
    token's text starts in its text; `bytes` its UTF-8 bytes (a token may hold part of a character,
    whose text alone is U+FFFD)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float, tuple[int, ...]], ...] | None
    offset: int
    bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What one request asks the model for (already tokenized and checked against the context)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely at its step
    prompt_logprobs: bool = False  # echo: also the prompt tokens' logprobs (needs logprobs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this delta completes
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first event of an echo stream


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, a final end-of-text token included
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per text token (a final end-of-text token is not text)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Failed:
    message: str


class Job:
    """One submitted request: its parameters, the events the worker sends back, a cancel flag."""

    def __init__(self, request: Completion, loop: asyncio.AbstractEventLoop, served: ServedModel | None = None):
        self.request = request
        self.served = served
        self.cancelled = False  # set from the event loop, read by the worker (a plain bool is enough)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def send(self, event: Delta | Finished | Failed) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[Delta | Finished | Failed]:
        while True:
            event = await self._events.get()
            yield event
            if not isinstance(event, Delta):
                return

    async def result(self) -> Finished | Failed:
        async for event in self.events():
            if not isinstance(event, Delta):
                return event
        raise AssertionError("unreachable: events() ends with Finished or Failed")


@dataclass
class _Control:
    """A load or unload the worker runs between batches; `job` receives Finished or Failed."""

    kind: str  # "load" or "unload"
    served: ServedModel | None  # unload: the adapter leaving
    name: str
    path: str | None
    job: Job


class Engine:
    """`served`: the ids clients may ask for; default one, the loaded model under `model_name`.
    `adapters`: in adapters mode, the loader (cpuft.serve.adapters.AdapterLoader) that loads and
    unloads adapters on the live model; None when the model is served as loaded (merged)."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, max_queue: int = 16,
                 served: list[ServedModel] | None = None, adapters=None, model_name: str = "model"):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapters = adapters
        if served is None:
            served = [ServedModel(model_name, loaded.tokenizer, frozenset(stop_token_ids(loaded.tokenizer, loaded.model)))]
        self._served: dict[str, ServedModel] = {m.name: m for m in served}
        self._controls: list[_Control] = []
        self._waiting: deque[Job] = deque()
        self._batch: list[Job] = []  # the jobs being generated now
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="cpuft-serve-model", daemon=True)
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0, "batches": 0, "generated_tokens": 0}

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._condition:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            controls, self._controls = self._controls, []
            for job in self._batch:  # their rows end at the next token instead of running to max_tokens
                job.cancelled = True
            self._condition.notify_all()
        for job in waiting:
            job.cancelled = True
            job.send(Failed("the server is shutting down"))
        for control in controls:
            control.job.send(Failed("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def served(self) -> list[ServedModel]:
        with self._condition:
            return list(self._served.values())

    def lookup(self, name: str) -> ServedModel | None:
        with self._condition:
            return self._served.get(name)

    def submit(self, request: Completion, served: ServedModel | None = None) -> Job:
        job = Job(request, asyncio.get_running_loop(), served or next(iter(self._served.values())))
        with self._condition:
            if not self.alive:
                raise EngineStopped("the model worker is not running")
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._condition.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job if it still waits, else stop its row at the next token."""
        with self._condition:
            job.cancelled = True
            try:
                self._waiting.remove(job)
                self.counters["cancelled"] += 1
            except ValueError:
                pass  # running or done
            self._condition.notify()  # an unload may have been waiting for this job

    def load_adapter(self, name: str, path: str) -> Job:
        """Queue loading the adapter at `path` as `name`; its job ends Finished once it is served."""
        with self._condition:
            if self.adapters is None:
                raise AdapterRefused(400, "this server merged its one adapter into the base at start-up, so it cannot"
                                     " take more; start it in adapters mode (cpuft serve NAME=RUN_DIR ...) to load adapters live")
            if name in self._served or any(c.name == name for c in self._controls):
                raise AdapterRefused(400, f"the model '{name}' is already served (or being loaded); unload it first or pick another lora_name")
            return self._queue_control("load", None, name, path)

    def unload_adapter(self, name: str) -> Job:
        """Stop routing requests to `name` now; unload it once no queued or running request uses it."""
        with self._condition:
            served = self._served.get(name)
            if served is None:
                raise AdapterRefused(404, f"the model '{name}' is not served (GET /v1/models lists those that are)")
            if self.adapters is None or served.adapter is None:
                raise AdapterRefused(400, f"'{name}' is the model this server was started with, not a loaded adapter; it cannot be unloaded")
            if sum(m.adapter is not None for m in self._served.values()) == 1:
                raise AdapterRefused(400, f"'{name}' is the only adapter served; load another before unloading it")
            del self._served[name]
            return self._queue_control("unload", served, name, None)

    def _queue_control(self, kind: str, served: ServedModel | None, name: str, path: str | None) -> Job:
        if not self.alive:
            raise EngineStopped("the model worker is not running")
        job = Job(Completion(prompt_ids=(), max_tokens=0), asyncio.get_running_loop(), served)
        self._controls.append(_Control(kind, served, name, path, job))
        self._condition.notify()
        return job

    def stats(self) -> dict:
        with self._condition:
            return {"waiting": len(self._waiting), "running": len(self._batch), **self.counters}

    # ------------------------------------------------------------------ worker side

    def _work(self) -> None:
        while True:
            control = None
            with self._condition:
                while not self._waiting and not self._runnable_control() and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                control = self._runnable_control()
                if control is not None:
                    self._controls.remove(control)
                else:
                    batch = self._batch = self._take_batch()
            if control is not None:
                self._run_control(control)
                continue
            try:
                self._generate(batch)
            finally:
                with self._condition:
                    self._batch = []

    def _runnable_control(self) -> _Control | None:
        """A load runs at once; an unload once no waiting request uses its adapter (the running
        batch has ended: controls run between batches)."""
        for control in self._controls:
            if control.kind == "load" or not any(job.served is control.served for job in self._waiting):
                return control
        return None

    def _run_control(self, control: _Control) -> None:
        try:
            if control.kind == "load":
                served = self.adapters.load(self.loaded.model, control.name, control.path)
                with self._condition:
                    self._served[control.name] = served
            else:
                self.adapters.unload(self.loaded.model, control.served)
        except UserError as exc:
            control.job.send(Failed(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001  (PEFT's own failure: answered, and the worker serves on)
            control.job.send(Failed(f"{control.kind}ing the adapter failed: {first_line(exc)}"))
            return
        control.job.send(Finished("", "stop", 0, 0))

    def _take_batch(self) -> list[Job]:
        first = self._waiting.popleft()
        batch = [first]
        if first.request.greedy:
            for job in list(self._waiting):
                if len(batch) >= self.max_batch_size:
                    break
                if job.request.greedy:
                    self._waiting.remove(job)
                    batch.append(job)
        return batch

    def _generate(self, batch: list[Job]) -> None:
        rows = [_Row(job) for job in batch]
        try:
            for row in rows:
                if row.request.prompt_logprobs:
                    row.set_prompt_logprobs(self._score_prompt(row.job))
            for row in rows:
                if row.request.max_tokens == 0:  # echo only: the prompt's scores are the whole answer
                    row.finish("length")
            generating = [row for row in rows if not row.done]
            if generating:
                self._run_generate(generating)
        except Exception as exc:  # a failed batch fails its open rows; the worker serves the next batch
            message = f"generation failed: {first_line(exc)}"
            for row in rows:
                if not row.done:
                    row.fail(message)
        for row in rows:
            if not row.done:  # generate stopped at max_new_tokens before the row saw its last token
                row.finish("length")
        with self._condition:
            self.counters["batches"] += 1
            for row in rows:
                self.counters[row.outcome] += 1
                self.counters["generated_tokens"] += row.generated

    def _adapter_kwargs(self, jobs: list[Job]) -> dict:
        if self.adapters is None:
            return {}
        return {"adapter_names": [job.served.adapter for job in jobs]}

    def _run_generate(self, rows: list[_Row]) -> None:
        model = self.loaded.model
        jobs = [row.job for row in rows]
        pad_id = jobs[0].served.tokenizer.pad_token_id
        width = max(len(job.request.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r, job in enumerate(jobs):  # left padding: every row's next token lands in the same column
            ids = job.request.prompt_ids
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids):] = 1
        first = jobs[0].request
        settings = GenerationSettings(
            max_new_tokens=max(job.request.max_tokens for job in jobs), temperature=first.temperature,
            top_p=first.top_p, seed=first.seed if first.seed is not None else secrets.randbits(63),
        )
        kwargs = settings.generate_kwargs(jobs[0].served.tokenizer)
        kwargs["pad_token_id"] = pad_id
        kwargs["eos_token_id"] = None  # rows end one by one in _RowStopper (ignore_eos, several eos ids)
        scores = _StepScores([job.request for job in jobs], width)
        if scores.active:
            kwargs["logits_processor"] = LogitsProcessorList([scores])
        device = device_of(model)
        torch.manual_seed(settings.seed)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                stopping_criteria=StoppingCriteriaList([_RowStopper(rows, scores)]),
                **kwargs, **self._adapter_kwargs(jobs),
            )

    def _score_prompt(self, job: Job) -> tuple[TokenLogprob, ...]:
        """The prompt tokens' logprobs under the job's model: one forward over the prompt."""
        ids = list(job.request.prompt_ids)
        tokenizer = job.served.tokenizer
        model = self.loaded.model
        tensor = torch.tensor([ids], dtype=torch.long, device=device_of(model))
        with torch.inference_mode():
            logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor), **self._adapter_kwargs([job])).logits
        # The last len(ids) positions: a prompt-tuning adapter puts its virtual tokens first.
        logprobs = torch.log_softmax(logits[0, -len(ids):].float(), dim=-1)
        k = job.request.logprobs or 0
        offsets = _text_offsets(tokenizer, ids)
        entries = [_entry(tokenizer, ids[0], None, None, offsets[0])]
        for i in range(1, len(ids)):
            row = logprobs[i - 1]
            entries.append(_entry(tokenizer, ids[i], float(row[ids[i]]), _top(tokenizer, row, k), offsets[i]))
        return tuple(entries)


class _StepScores(LogitsProcessor):
    """Per generate step: the raw log-softmax (for rows that want logprobs), then each row's
    presence/frequency penalty over its own generated tokens."""

    def __init__(self, requests: list[Completion], prompt_width: int):
        self.width = prompt_width
        self.want_logprobs = any(r.logprobs is not None for r in requests)
        self.presence = torch.tensor([[r.presence_penalty] for r in requests], dtype=torch.float32)
        self.frequency = torch.tensor([[r.frequency_penalty] for r in requests], dtype=torch.float32)
        self.penalize = bool(self.presence.any() or self.frequency.any())
        self.active = self.want_logprobs or self.penalize
        self.logprobs: torch.Tensor | None = None  # this step's, read by _RowStopper once the token is chosen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.want_logprobs:
            self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        generated = input_ids[:, self.width:]
        if self.penalize and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            device = scores.device
            scores = scores - self.presence.to(device) * (counts > 0) - self.frequency.to(device) * counts
        return scores


def _top(tokenizer, logprobs: torch.Tensor, k: int) -> tuple[tuple[str, float, tuple[int, ...]], ...]:
    if k <= 0:
        return ()
    values, ids = logprobs.topk(k)
    return tuple((tokenizer.decode([i]), float(v), token_bytes(tokenizer, i)) for v, i in zip(values.tolist(), ids.tolist()))


def _entry(tokenizer, token: int, logprob: float | None, top, offset: int) -> TokenLogprob:
    return TokenLogprob(tokenizer.decode([token]), logprob, top, offset, token_bytes(tokenizer, token))


_BYTE_OF_CHAR: dict[str, int] | None = None


def token_bytes(tokenizer, token: int) -> tuple[int, ...]:
    """The token's own bytes: byte-level BPE (GPT-2, Llama 3, Qwen) maps each byte to a printable
    character, SentencePiece spells a lone byte <0xNN>; anything else is its decoded text's UTF-8."""
    global _BYTE_OF_CHAR
    piece = tokenizer.convert_ids_to_tokens(token)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if isinstance(piece, str) and type(decoder).__name__ == "ByteLevel" and token not in tokenizer.all_special_ids:
        if _BYTE_OF_CHAR is None:
            _BYTE_OF_CHAR = {char: byte for byte, char in _byte_level_alphabet().items()}
        if all(char in _BYTE_OF_CHAR for char in piece):
            return tuple(_BYTE_OF_CHAR[char] for char in piece)
    if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return (int(piece[3:5], 16),)
        except ValueError:
            pass
    return tuple(tokenizer.decode([token]).encode("utf-8"))


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which every byte-level BPE tokenizer shares:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _text_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in the decoded text of `ids` (decoding each prefix: exact
    where a token's text depends on its neighbours, as with SentencePiece's leading spaces)."""
    return [len(tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]


class _Row:
    """One request's progress inside a batch."""

    def __init__(self, job: Job):
        self.job = job
        self.request = job.request
        self.tokenizer = job.served.tokenizer
        self.eos_ids = job.served.eos_ids
        self.tokens: list[int] = []  # the text's tokens (a final end-of-text token is not text)
        self.generated = 0
        self.streamed = 0  # characters already sent as Deltas
        self.done = False
        self.outcome = "completed"
        self.entries: list[TokenLogprob] = []  # logprobs of self.tokens (when asked for)
        self.entry_ends: list[int] = []  # the text's length once each token was added
        self.released = 0  # entries already sent with Deltas
        self.prompt_entries: tuple[TokenLogprob, ...] | None = None

    def set_prompt_logprobs(self, entries: tuple[TokenLogprob, ...]) -> None:
        self.prompt_entries = entries
        if self.request.stream:
            self.job.send(Delta("", prompt_logprobs=entries))

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def step(self, token: int, logprobs: torch.Tensor | None) -> bool:
        """Take the row's newest token (and this step's log-softmax row); True once the row is finished."""
        if self.job.cancelled:
            self.done, self.outcome = True, "cancelled"
            return True
        self.generated += 1
        if token in self.eos_ids and not self.request.ignore_eos:
            return self.finish("stop")
        text = None
        if self.request.logprobs is not None and logprobs is not None:
            offset = self.entry_ends[-1] if self.entry_ends else 0
            self.entries.append(_entry(self.tokenizer, token, float(logprobs[token]),
                                       _top(self.tokenizer, logprobs, self.request.logprobs), offset))
            self.tokens.append(token)
            text = self.text()
            self.entry_ends.append(len(text))
        else:
            self.tokens.append(token)
        if self.request.stop or self.request.stream:
            text = self.text() if text is None else text
            cut = _first_stop(text, self.request.stop)
            if cut is not None:
                return self.finish("stop", text[:cut])
        if self.generated >= self.request.max_tokens:
            return self.finish("length", text)
        if self.request.stream:
            ready = len(text) - _held_back(text, self.request.stop)
            if ready > self.streamed:
                self.job.send(Delta(text[self.streamed:ready], self._release(ready)))
                self.streamed = ready
        return False

    def _release(self, ready: int) -> tuple[TokenLogprob, ...]:
        """The entries of the tokens whose text ends within the first `ready` characters."""
        start = self.released
        while self.released < len(self.entries) and self.entry_ends[self.released] <= ready:
            self.released += 1
        return tuple(self.entries[start:self.released])

    def finish(self, reason: str, text: str | None = None) -> bool:
        text = self.text() if text is None else text
        entries = None
        if self.request.logprobs is not None:
            # A stop string cuts the text: keep the tokens whose text starts before the cut.
            kept = [e for e in self.entries if e.offset < len(text)] if len(text) < (self.entry_ends[-1] if self.entry_ends else 0) else self.entries
            entries = tuple(kept)
        if self.request.stream:
            rest = tuple(entries[self.released:]) if entries is not None else ()
            if len(text) > self.streamed or rest:
                self.job.send(Delta(text[self.streamed:], rest))
        self.job.send(Finished(text, reason, len(self.request.prompt_ids), self.generated, entries, self.prompt_entries))
        self.done = True
        return True

    def fail(self, message: str) -> None:
        self.job.send(Failed(message))
        self.done, self.outcome = True, "failed"


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: an undecodable byte, or a stop string's start."""
    complete = text.rstrip("\ufffd")  # U+FFFD: a multi-byte character whose other bytes are still to come
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(complete)), longest, -1):
            if complete.endswith(stop[:k]):
                longest = k
                break
    return len(text) - len(complete) + longest


class _RowStopper(StoppingCriteria):
    """Called by generate after every token; answers, per row, whether that row is finished."""

    def __init__(self, rows: list[_Row], scores: _StepScores):
        self.rows = rows
        self.scores = scores

    def __call__(self, input_ids, scores, **kwargs):
        newest = input_ids[:, -1].tolist()
        logprobs = self.scores.logprobs
        finished = [row.done or row.step(token, None if logprobs is None else logprobs[r])
                    for r, (row, token) in enumerate(zip(self.rows, newest))]
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)
