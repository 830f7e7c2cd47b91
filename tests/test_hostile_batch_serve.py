"""Hostile cases for `cpuft batch` and `cpuft serve` (issue 21, items 13 and 14).

A batch state database that is garbage, cut short or another program's SQLite file is refused by
`cpuft batch status` and `cpuft batch run` with exit 2, the file named and left byte for byte as
it was (it may be the queue's only history). A non-streamed request whose client hangs up stops
its generation, as a streamed one does, and is counted as cancelled in /health.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from cpuft.batch.state import StateStore
from cpuft.errors import UserError
from tests.conftest import run_cpuft, start_serve, write_jsonl

QA_ROWS = [{"prompt": f"What is {a} times {b}?", "completion": f"{a} times {b} is {a * b}."}
           for a in range(2, 8) for b in range(2, 6)]

# ----------------------------------------------------------------------------- the batch state database


@pytest.fixture
def queue_path(tmp_path, tiny_model_dir) -> Path:
    """A valid two-job queue; its state database is where the tests break things."""
    write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    path = tmp_path / "queue.yaml"
    path.write_text(textwrap.dedent(f"""\
        defaults: {{model: {tiny_model_dir}, dataset: qa.jsonl, max_steps: 2}}
        jobs:
          - {{name: first}}
          - {{name: second, lora_r: 4}}
        """))
    return path


def real_state_database(queue_path: Path) -> Path:
    """The queue's state.sqlite with history in it, made by the store cpuft uses: one job done, one failed."""
    from cpuft.batch.queue import default_state_dir, load_queue

    queue = load_queue(queue_path)
    database = default_state_dir(queue_path) / "state.sqlite"
    store = StateStore(database)
    store.sync([(job.name, str(job.run_dir), job.config_sha) for job in queue.jobs])
    for job, outcome in zip(queue.jobs, ("done", "failed")):
        store.start(job.name, os.getpid(), "host", job.config_sha, None)
        store.finish(job.name, outcome, 0 if outcome == "done" else 1, summary={"steps": 2, "note": "x" * 2000})
    store.close()
    return database


def garbage(database: Path) -> None:
    database.write_bytes(bytes(range(256)) * 20)


def truncated(database: Path) -> None:
    data = database.read_bytes()
    assert len(data) >= 3 * 4096  # several pages, so half of it cuts the jobs table
    database.write_bytes(data[: len(data) // 2])


def another_programs(database: Path) -> None:
    database.unlink()
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('keep me')")
    db.close()


@pytest.mark.parametrize("damage", [garbage, truncated, another_programs], ids=lambda f: f.__name__)
def test_a_damaged_or_foreign_state_database_is_refused_and_left_as_it_is(queue_path, damage):
    database = real_state_database(queue_path)
    damage(database)
    before = database.read_bytes()
    runs = queue_path.parent / "runs"

    for action in ("status", "run"):
        result = run_cpuft("batch", action, queue_path, timeout=300)
        assert result.returncode == 2, (action, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert f"{database} is not a usable cpuft batch state database" in result.stderr, result.stderr
        assert "Restore it from a backup, or move it aside" in result.stderr
        assert database.read_bytes() == before, f"`cpuft batch {action}` changed {database}"
    assert not runs.exists()  # no job was started


def test_a_state_database_moved_aside_lets_the_queue_start_afresh(queue_path):
    """What the message tells the user to do works; a good store with history still opens as before."""
    database = real_state_database(queue_path)
    kept = StateStore(database)
    assert [(r.name, r.state) for r in kept.all()] == [("first", "done"), ("second", "failed")]
    kept.close()

    garbage(database)
    with pytest.raises(UserError, match="not a usable cpuft batch state database"):
        StateStore(database)
    database.rename(database.with_name("state.sqlite.bad"))
    status = run_cpuft("batch", "status", queue_path, "--json")
    assert status.returncode == 0, status.stderr
    assert [job["state"] for job in json.loads(status.stdout)["jobs"]] == ["queued", "queued"]

    database.write_bytes(b"")  # an empty file (e.g. touched) is a new store, as before
    assert StateStore(database).all() == []


# ----------------------------------------------------------------------------- the server

# ignore_eos: the random model must not end early. Long enough that generating every token takes
# many seconds on any machine: the test closes its connection once the request is running.
MAX_TOKENS = 1900


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process, url, _ = start_serve(tiny_model_dir, "--dtype", "fp32", "--served-model-name", "tiny", "--max-batch-size", "1")
    yield url
    process.terminate()
    process.wait(timeout=30)


def health(url: str) -> dict:
    response = httpx.get(f"{url}/health", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(url: str, done, what: str, minutes: float = 5) -> dict:
    """Poll /health until done(health); the deadline only catches a hang."""
    deadline = time.monotonic() + 60 * minutes
    while not done(state := health(url)):
        assert time.monotonic() < deadline, f"still waiting for {what}: {state}"
        time.sleep(0.05)
    return state


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a whole HTTP request on a raw socket and return the socket, its reply unread."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection


ROUTES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Tell me a long story."}]},
    "/v1/completions": {"prompt": "Once upon a time"},
}


@pytest.mark.parametrize("path", ROUTES)
def test_a_client_that_leaves_before_a_plain_reply_stops_its_generation(server, path):
    before = health(server)
    body = {"model": "tiny", **ROUTES[path], "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    connection = open_request(server, path, body)
    wait_until(server, lambda h: h["running"] == 1, "the request to start")
    connection.close()  # the client leaves with its reply still being generated

    after = wait_until(server, lambda h: h["running"] == 0 and h["waiting"] == 0, "the server to be idle")
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["completed"] == before["completed"], after
    assert after["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS // 2, after

    # and a client that stays gets its whole reply
    reply = httpx.post(f"{server}{path}", json={**body, "max_tokens": 5}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5


def test_a_plain_request_waiting_for_the_model_is_dropped_when_its_client_leaves(server):
    """With --max-batch-size 1 the second request waits behind the first; its client leaving
    removes it from the queue, so it never reaches the model."""
    before = health(server)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    running = open_request(server, "/v1/completions", body)
    wait_until(server, lambda h: h["running"] == 1, "the first request to start")
    waiting = open_request(server, "/v1/completions", body)
    wait_until(server, lambda h: h["waiting"] == 1, "the second request to queue")
    waiting.close()
    wait_until(server, lambda h: h["waiting"] == 0, "the second request to leave the queue")
    assert health(server)["cancelled"] == before["cancelled"] + 1
    running.close()

    after = wait_until(server, lambda h: h["running"] == 0 and h["waiting"] == 0, "the server to be idle")
    assert after["cancelled"] == before["cancelled"] + 2, after
    assert after["batches"] == before["batches"] + 1, after  # the dropped request never ran
    assert after["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS // 2, after
