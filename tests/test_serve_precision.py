"""`cpuft serve --dtype auto` picks fp32, bf16 or int8 by measuring them (cpuft.serve.precision).

Which precision wins depends on the CPU and its load, so no test asserts a winner from a real
measurement: the rule is tested on given numbers, the measurement on what it returns and where
it is cached (counted calls, not times), the CLI on saying why and serving in what it said.
"""

from __future__ import annotations

import argparse

import httpx
import pytest

from cpuft.serve import precision
from cpuft.serve.precision import (
    INT8_MARGIN,
    NEW_TOKENS,
    PrecisionCost,
    choose,
    choose_precision,
)
from tests.conftest import start_serve


def cost(name: str, request_seconds: float) -> PrecisionCost:
    dtype = "fp32" if name == "int8" else name
    return PrecisionCost(name, dtype, prefill_seconds=request_seconds / 2, decode_seconds=request_seconds / 2 / NEW_TOKENS,
                         setup_seconds=7.0 if name == "int8" else 0.0)


def test_the_cheapest_float_wins_and_int8_only_by_its_margin():
    winner, why = choose([cost("fp32", 2.0), cost("bf16", 1.0), cost("int8", 1.0 / (INT8_MARGIN - 0.1))])
    assert winner.name == "bf16" and f"under the {INT8_MARGIN}x" in why
    winner, why = choose([cost("fp32", 2.0), cost("bf16", 1.0), cost("int8", 0.4)])
    assert winner.name == "int8" and winner.dtype == "fp32"
    assert "2.50x cheaper per request than bf16" in why and "~7 s" in why  # the quantisation cost is said
    winner, _ = choose([cost("fp32", 0.9), cost("bf16", 1.0)])
    assert winner.name == "fp32"


def test_measurement_is_cached_per_threads_and_candidates(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    calls = []
    real = precision.measure_costs
    monkeypatch.setattr(precision, "measure_costs", lambda *a: calls.append(a) or real(*a))
    config = AutoConfig.from_pretrained(tiny_model_dir)

    first = choose_precision(config, 1, "torch-dynamic")
    assert [c.name for c in first.costs] == ["fp32", "bf16", "int8"] and len(calls) == 1
    assert all(c.prefill_seconds > 0 and c.decode_seconds > 0 for c in first.costs)
    assert first.costs[2].setup_seconds > 0 and first.costs[0].setup_seconds == 0
    assert first.reason.startswith(f"auto: {first.name}, ") and "measured now" in first.reason
    cached = list((tmp_path / "serve-precision").glob("*.json"))
    assert len(cached) == 1 and str(cached[0]) in first.reason

    again = choose_precision(config, 1, "torch-dynamic")
    assert len(calls) == 1 and again.costs == first.costs and again.name == first.name
    assert "measured earlier, cached in" in again.reason

    floats_only = choose_precision(config, 1, None)  # adapters mode: int8 is no candidate
    assert [c.name for c in floats_only.costs] == ["fp32", "bf16"] and floats_only.name in ("fp32", "bf16")
    assert len(calls) == 2 and len(list((tmp_path / "serve-precision").glob("*.json"))) == 2


def test_an_explicit_choice_is_not_measured(monkeypatch):
    monkeypatch.setattr(precision, "measure_costs", lambda *a: pytest.fail("measured an explicit choice"))
    for flags in ({"dtype": "fp32"}, {"dtype": "bf16"}, {"int8": True}, {"int8_method": "torch-dynamic"}, {"nf4": True}):
        args = argparse.Namespace(**{"dtype": "auto", "int8": False, "int8_method": None, "nf4": False, **flags})
        before = vars(args).copy()
        assert precision.apply_measured_precision(args, "unused", int8_allowed=True) is None
        assert vars(args) == before


def test_serve_auto_says_why_and_serves_in_that_precision(tiny_model_dir, tmp_path):
    process, url, log = start_serve(tiny_model_dir, "--threads", "1", env={"CPUFT_CACHE_DIR": str(tmp_path)}, timeout=240)
    try:
        reasons = [line for line in log if line.startswith("precision: auto: ")]
        assert len(reasons) == 1, "".join(log)
        chosen = reasons[0].removeprefix("precision: auto: ").split(",")[0]
        assert chosen in ("fp32", "bf16", "int8")
        for name in ("fp32", "bf16", "int8"):
            assert f"{name} " in reasons[0] and "tokens/s" in reasons[0]
        served = httpx.get(f"{url}/health", timeout=30).json()["precision"]
        assert served.startswith("int8 (") if chosen == "int8" else served == chosen
        reply = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"model": str(tiny_model_dir), "prompt": "hello", "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        assert len(list((tmp_path / "serve-precision").glob("*.json"))) == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
