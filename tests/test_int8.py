"""cpuft.inference.int8: every available INT8 path quantises every linear layer and stays close to fp32.

Speed is not tested here (scripts/bench_int8.py measures it); these tests check that each path is
real int8 and numerically sane on a small random Llama.
"""

from __future__ import annotations

import copy

import pytest

from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.inference.int8 import (
    DEFAULT_INT8_BY_CPU_KIND,
    INT8_METHODS,
    available_int8_methods,
    cpu_kind,
    default_int8_method,
    quantize_for_cpu_inference,
)

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


@pytest.mark.parametrize("method", AVAILABLE)
def test_each_method_quantises_every_linear_and_tracks_fp32(float_model, method):
    import torch

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = float_model(ids).logits
    model = quantize_for_cpu_inference(copy.deepcopy(float_model), method)
    assert float_linear_count(float_model) == 2 * 7 + 1
    assert float_linear_count(model) == 0, "a linear layer was left in floating point"
    # lm_head was untied and quantised; the embedding lookup stays exact.
    assert torch.equal(model.get_input_embeddings().weight, float_model.get_input_embeddings().weight)
    with torch.inference_mode():
        logits = model(ids).logits
    relative_error = ((logits - reference).norm() / reference.norm()).item()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert relative_error < 0.1, relative_error
    assert agreement > 0.8, agreement
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 12)


def test_unknown_method_is_a_user_error(float_model):
    with pytest.raises(UserError, match="unknown int8 method"):
        quantize_for_cpu_inference(copy.deepcopy(float_model), "int8-magic")


def _machine(flags: set[str]) -> Machine:
    return Machine(cpu_name="synthetic", cpu_flags=frozenset(flags), physical_cores=4, logical_cores=8, usable_cpus=8)


@pytest.mark.parametrize("flags, kind", [
    ({"avx2", "fma3"}, "avx2"),
    ({"avx2", "avx512_f", "avx512_vnni"}, "avx512"),
    ({"avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "amx"),
    (set(), "other"),
])
def test_default_method_follows_the_cpu_kind_table(flags, kind):
    machine = _machine(flags)
    assert cpu_kind(machine) == kind
    chosen = default_int8_method(machine)
    assert chosen in AVAILABLE
    if DEFAULT_INT8_BY_CPU_KIND[kind] in AVAILABLE:
        assert chosen == DEFAULT_INT8_BY_CPU_KIND[kind]


def test_every_default_is_a_known_method():
    assert set(DEFAULT_INT8_BY_CPU_KIND.values()) <= set(INT8_METHODS)
