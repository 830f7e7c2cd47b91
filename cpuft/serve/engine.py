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

Limits: one model, one batch at a time (no continuous batching, no KV-cache reuse between
requests); prompt/context limits are the caller's to check (app.py).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from cpuft.errors import first_line
from cpuft.inference.generate import GenerationSettings, stop_token_ids
from cpuft.inference.loading import LoadedModel, device_of


class QueueFull(Exception):
    """`max_queue` requests are already waiting: the caller answers 429."""


class EngineStopped(Exception):
    """The worker is not running (shutting down, or it died): the caller answers 503."""


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, a final end-of-text token included


@dataclass(frozen=True)
class Failed:
    message: str


class Job:
    """One submitted request: its parameters, the events the worker sends back, a cancel flag."""

    def __init__(self, request: Completion, loop: asyncio.AbstractEventLoop):
        self.request = request
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


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, max_queue: int = 16):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._eos_ids = frozenset(stop_token_ids(loaded.tokenizer, loaded.model))
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
            for job in self._batch:  # their rows end at the next token instead of running to max_tokens
                job.cancelled = True
            self._condition.notify_all()
        for job in waiting:
            job.cancelled = True
            job.send(Failed("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request: Completion) -> Job:
        job = Job(request, asyncio.get_running_loop())
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

    def stats(self) -> dict:
        with self._condition:
            return {"waiting": len(self._waiting), "running": len(self._batch), **self.counters}

    # ------------------------------------------------------------------ worker side

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                batch = self._batch = self._take_batch()
            try:
                self._generate(batch)
            finally:
                with self._condition:
                    self._batch = []

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
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        rows = [_Row(job, tokenizer, self._eos_ids) for job in batch]
        width = max(len(job.request.prompt_ids) for job in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r, job in enumerate(batch):  # left padding: every row's next token lands in the same column
            ids = job.request.prompt_ids
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids):] = 1
        first = batch[0].request
        settings = GenerationSettings(
            max_new_tokens=max(job.request.max_tokens for job in batch), temperature=first.temperature,
            top_p=first.top_p, seed=first.seed if first.seed is not None else secrets.randbits(63),
        )
        kwargs = settings.generate_kwargs(tokenizer)
        kwargs["eos_token_id"] = None  # rows end one by one in _RowStopper (ignore_eos, several eos ids)
        device = device_of(model)
        try:
            torch.manual_seed(settings.seed)
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    stopping_criteria=StoppingCriteriaList([_RowStopper(rows)]), **kwargs,
                )
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


class _Row:
    """One request's progress inside a batch."""

    def __init__(self, job: Job, tokenizer, eos_ids: frozenset[int]):
        self.job = job
        self.request = job.request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.tokens: list[int] = []  # the text's tokens (a final end-of-text token is not text)
        self.generated = 0
        self.streamed = 0  # characters already sent as Deltas
        self.done = False
        self.outcome = "completed"

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def step(self, token: int) -> bool:
        """Take the row's newest token; True once the row is finished."""
        if self.job.cancelled:
            self.done, self.outcome = True, "cancelled"
            return True
        self.generated += 1
        if token in self.eos_ids and not self.request.ignore_eos:
            return self.finish("stop")
        self.tokens.append(token)
        text = None
        if self.request.stop or self.request.stream:
            text = self.text()
            cut = _first_stop(text, self.request.stop)
            if cut is not None:
                return self.finish("stop", text[:cut])
        if self.generated >= self.request.max_tokens:
            return self.finish("length", text)
        if self.request.stream:
            ready = len(text) - _held_back(text, self.request.stop)
            if ready > self.streamed:
                self.job.send(Delta(text[self.streamed:ready]))
                self.streamed = ready
        return False

    def finish(self, reason: str, text: str | None = None) -> bool:
        text = self.text() if text is None else text
        if self.request.stream and len(text) > self.streamed:
            self.job.send(Delta(text[self.streamed:]))
        self.job.send(Finished(text, reason, len(self.request.prompt_ids), self.generated))
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

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        newest = input_ids[:, -1].tolist()
        finished = [row.done or row.step(token) for row, token in zip(self.rows, newest)]
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)
