"""cpuft.inference.int8: every available INT8 path quantises every linear layer and stays close to
fp32, in each model dtype it accepts; the default method per CPU kind is the one docs/int8.md
measured fastest.

Speed is not measured here (scripts/bench_int8.py does, on a 128M model); these tests check that
each path is real int8 and numerically sane on a small random Llama, and that the default follows
the published measurements.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import pytest

from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.inference.int8 import (
    available_int8_methods,
    default_int8_method,
    int8_model_dtype,
    quantize_for_cpu_inference,
)

INT8_DOC = Path(__file__).resolve().parents[1] / "docs" / "int8.md"

AVAILABLE = [m for m, missing in available_int8_methods().items() if missing is None]


@pytest.fixture(scope="module")
def float_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def float_linear_count(model) -> int:
    import torch

    return sum(1 for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype.is_floating_point
               and type(m.weight) in (torch.Tensor, torch.nn.Parameter))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", AVAILABLE)
def test_each_method_quantises_every_linear_and_tracks_fp32(float_model, method, dtype):
    """bf16 is the dtype cpuft plans on AMX / AVX-512-BF16 CPUs; a method that cannot take bf16
    activations runs in the dtype int8_model_dtype names instead."""
    import torch

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = float_model(ids).logits
    runs_in, _ = int8_model_dtype(method, dtype)
    start = copy.deepcopy(float_model).to({"fp32": torch.float32, "bf16": torch.bfloat16}[runs_in])
    model = quantize_for_cpu_inference(start, method)
    assert float_linear_count(float_model) == 2 * 7 + 1
    assert float_linear_count(model) == 0, "a linear layer was left in floating point"
    # lm_head was untied and quantised; the embedding lookup stays exact.
    assert torch.equal(model.get_input_embeddings().weight.float(),
                       float_model.get_input_embeddings().weight.to(start.dtype).float())
    with torch.inference_mode():
        logits = model(ids).logits.float()
    relative_error = ((logits - reference).norm() / reference.norm()).item()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert relative_error < 0.1, relative_error
    assert agreement > 0.8, agreement
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 12)


def test_unknown_method_is_a_user_error(float_model):
    with pytest.raises(UserError, match="unknown int8 method"):
        quantize_for_cpu_inference(copy.deepcopy(float_model), "int8-magic")


def test_torch_dynamic_runs_in_fp32_when_bf16_is_planned(float_model):
    import torch

    # fbgemm's int8 linear reads fp32 only: on a bf16 model its first forward pass fails with
    # "expected scalar type Float but found BFloat16". cpuft loads that method in fp32 and says why...
    dtype, why = int8_model_dtype("torch-dynamic", "bf16")
    assert dtype == "fp32" and "not bf16" in why
    assert int8_model_dtype("torch-dynamic", "fp32") == ("fp32", None)
    # ... and a bf16 model handed to it directly is refused before any weight is touched.
    bf16_model = copy.deepcopy(float_model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="torch-dynamic needs a fp32 model, got bf16"):
        quantize_for_cpu_inference(bf16_model, "torch-dynamic")
    assert all(type(m) is torch.nn.Linear for m in bf16_model.modules() if "Linear" in type(m).__name__)


# ----------------------------------------------------------------------------- the default follows the measurements


def _machine(flags: set[str]) -> Machine:
    return Machine(cpu_name="synthetic", cpu_flags=frozenset(flags), physical_cores=4, logical_cores=8, usable_cpus=8)


# Representative flags for each kind a results section of docs/int8.md is labelled with.
KIND_FLAGS = {
    "avx2": {"avx2", "fma3"},
    "avx512": {"avx2", "fma3", "avx512_f", "avx512_vnni", "avx512_bf16"},
    "amx": {"avx2", "fma3", "avx512_f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"},
}


def measured_decode_ratios() -> dict[str, dict[str, float]]:
    """{cpu kind: {method: decode speed-up over fp32}} from each "## Results ... (cpu kind `k`)"
    section's first table in docs/int8.md. The CPU-time ratio where the table has one (the
    doc's chosen measure on shared machines), else the wall-clock one."""
    text = INT8_DOC.read_text()
    results = {}
    for match in re.finditer(r"^## Results .*\(cpu kind `(\w+)`\)$", text, flags=re.M):
        lines = text[match.end():].split("\n## ", 1)[0].splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("|"))
        table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
        header = [cell.strip() for cell in table[0].strip("|").split("|")]
        decode = next(i for i, cell in enumerate(header) if "decode" in cell)
        if "×" not in header[decode]:
            following = range(decode + 1, min(decode + 3, len(header)))
            decode = next((i for i in following if "CPU time" in header[i]), decode + 1)
        ratios = {}
        for line in table[2:]:
            cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
            method = cells[0]
            if method in ("fp32", "bf16") or "bench only" in method:
                continue
            ratios[method.split(" (")[0]] = float(cells[decode])
        results[match.group(1)] = ratios
    return results


def test_docs_publish_measurements_for_every_x86_kind():
    assert set(measured_decode_ratios()) == set(KIND_FLAGS)


@pytest.mark.parametrize("kind", sorted(KIND_FLAGS))
def test_default_method_is_the_fastest_measured_decode_for_the_cpu_kind(kind):
    ratios = measured_decode_ratios()[kind]
    fastest = max(ratios, key=ratios.get)
    if fastest not in AVAILABLE:
        pytest.skip(f"{fastest} is not installed here")
    assert default_int8_method(_machine(KIND_FLAGS[kind])) == fastest, ratios


def test_default_falls_back_to_an_installed_method():
    # torch-dynamic ships with torch, so a CPU kind with no measurement still gets a working method.
    assert default_int8_method(_machine(set())) in AVAILABLE
