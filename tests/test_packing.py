"""Packing must not let attention cross sample boundaries; length grouping must cut padding.

The packed batch comes from TRL's own pipeline (SFTTrainer, packing=True: best-fit-decreasing
rows, padding-free collator), the model is a real Llama with SDPA attention, and every sample's
loss in the packed row is compared with the same tokens run alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from cpuft.bench.data import synthetic_conversations
from cpuft.data.packing import length_grouped_order
from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

# fp32 on CPU: SDPA with an explicit block-diagonal mask and SDPA with is_causal sum in a
# different order; measured differences are ~1e-6, so 1e-4 leaves room without hiding a leak
# (a leak moved losses by ~7e-3 on this random-init model, see test_a_cache_makes_samples_leak).
LOSS_TOLERANCE = 1e-4
SPEC = TinyModelSpec(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
NUM_SAMPLES = 5


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = synthetic_conversations(NUM_SAMPLES, seed=3, median_reply_words=15)
    texts = [m["content"] for row in synthetic_conversations(300, seed=4, median_reply_words=15) for m in row["messages"]]
    model_dir = build_tiny_model(tmp_path_factory.mktemp("packing") / "model", texts=texts, spec=SPEC)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("packing-run")), packing=True, max_length=2048,
        per_device_train_batch_size=1, use_cpu=True, bf16=False, activation_checkpointing=False,
        report_to=[], disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    return trainer, model, batch


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return list(zip(starts, starts[1:]))


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss at each position of a [1, T] row (T-1 values; ignored labels give 0)."""
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")


def _per_sample_losses(model, batch, **forward_kwargs) -> tuple[list[float], list[float]]:
    """(packed, alone): each sample's mean loss inside the packed row and run on its own."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward_kwargs).logits
    packed_losses = _token_losses(logits, batch["labels"])
    packed, alone = [], []
    for start, end in _segments(batch["position_ids"]):
        labels = batch["labels"][:, start:end]
        counted = (labels[0, 1:] != -100).sum()
        # Positions start..end-2 predict tokens start+1..end-1: exactly this sample's own targets.
        packed.append(float(packed_losses[start:end - 1].sum() / counted))
        with torch.no_grad():
            own = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits
        alone.append(float(_token_losses(own, labels).sum() / counted))
    return packed, alone


def test_trl_packs_whole_samples_into_one_row(packed):
    _, _, batch = packed
    assert batch["input_ids"].shape[0] == 1
    assert len(_segments(batch["position_ids"])) == NUM_SAMPLES
    assert "attention_mask" not in batch  # a 2D mask would switch off transformers' packed-sequence detection


def test_per_sample_loss_packed_equals_unpacked(packed):
    _, model, batch = packed
    packed_losses, alone_losses = _per_sample_losses(model, batch, use_cache=False)
    for index, (p, a) in enumerate(zip(packed_losses, alone_losses)):
        assert abs(p - a) < LOSS_TOLERANCE, f"sample {index}: packed {p:.6f} vs alone {a:.6f}"


def test_trainer_loss_on_packed_batch_equals_unpacked_mean(packed):
    """TRL's compute_loss (the path training takes) gives the token-weighted mean of the samples alone."""
    trainer, model, batch = packed
    _, alone_losses = _per_sample_losses(model, batch, use_cache=False)
    counts = [int((batch["labels"][0, s + 1:e] != -100).sum()) for s, e in _segments(batch["position_ids"])]
    expected = sum(loss * n for loss, n in zip(alone_losses, counts)) / sum(counts)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    assert abs(float(loss) - expected) < LOSS_TOLERANCE


def test_a_cache_makes_samples_leak(packed):
    """The control: with a KV cache transformers skips packed detection and samples attend to
    each other. Shows the comparison above can fail, and why `use_cache=False` matters."""
    _, model, batch = packed
    packed_losses, alone_losses = _per_sample_losses(model, batch, use_cache=True)
    assert abs(packed_losses[0] - alone_losses[0]) < LOSS_TOLERANCE  # the first sample has nothing before it
    assert max(abs(p - a) for p, a in zip(packed_losses[1:], alone_losses[1:])) > 10 * LOSS_TOLERANCE


def _padding(lengths: list[int], order: list[int], batch_size: int) -> int:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_order_is_a_permutation_that_cuts_padding():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.9)) + 1 for _ in range(192)]
    order = length_grouped_order(lengths, 16, seed=1)  # optimizer steps of 16 rows
    assert sorted(order) == list(range(len(lengths)))
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    for micro_batch in (4, 8, 16):  # however a step is cut into micro-batches
        assert _padding(lengths, order, micro_batch) < 0.25 * _padding(lengths, shuffled, micro_batch)
    assert order == length_grouped_order(lengths, 16, seed=1)  # resumable: same seed, same batches
    assert order != length_grouped_order(lengths, 16, seed=2)


def _rows_per_optimizer_step(order: list[int], micro_batch: int, accumulation: int, world: int) -> list[list[int]]:
    """The rows each optimizer step trains, dealt as a run of `world` processes deals them: the
    Trainer's sequential sampler cut into micro-batches (the last one short), under DDP
    accelerate's own BatchSamplerShard giving rank r micro-batches r, r + world, ... (one process
    keeps the plain batches: accelerate's prepare_data_loader), each rank accumulating its next
    `accumulation`."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    batches = BatchSampler(SequentialSampler(order), micro_batch, drop_last=False)
    per_rank = [list(batches)] if world == 1 else [
        list(BatchSamplerShard(batches, num_processes=world, process_index=rank)) for rank in range(world)]
    steps = -(-len(per_rank[0]) // accumulation)
    return [sorted(order[i] for batches in per_rank for batch in batches[k * accumulation:(k + 1) * accumulation]
                   for i in batch) for k in range(steps)]


def test_optimizer_steps_train_the_same_rows_however_the_global_batch_is_split():
    """One process with micro-batch 4 x 2 accumulation and every DDP split of the same global batch
    of 8 (a run resumed on another number of ranks too) train the same rows in every step. 101
    rows leave the last step short: it is filled, so DDP need not wrap around to the first rows."""
    rng = random.Random(5)
    lengths = [rng.randint(3, 400) for _ in range(101)]
    order = length_grouped_order(lengths, 8, seed=42)
    one_process = _rows_per_optimizer_step(order, 4, 2, 1)
    assert len(one_process) == 13 and all(len(step) == 8 for step in one_process)
    for micro_batch, accumulation, world in ((2, 2, 2), (1, 4, 2), (4, 1, 2), (1, 2, 4), (2, 1, 4), (8, 1, 1), (1, 1, 8)):
        split = _rows_per_optimizer_step(order, micro_batch, accumulation, world)
        assert split == one_process, (micro_batch, accumulation, world)
    # Every row is trained each epoch; the short step's filler repeats fewer than a step's rows.
    assert set(order) == set(range(101)) and len(order) == 104


def test_a_run_smaller_than_one_step_fills_it_by_repeating_rows():
    order = length_grouped_order([5, 9, 7], 8, seed=0)
    assert len(order) == 8 and sorted(order.count(row) for row in range(3)) == [2, 3, 3]  # in turn
    assert length_grouped_order([], 8, seed=0) == []


def _avx2_machine():
    from cpuft.hardware.probe import Machine

    return Machine.from_dict({"cpu_name": "test", "cpu_flags": ["avx2", "fma3"], "physical_cores": 2,
                              "logical_cores": 2, "usable_cpus": 2, "ram_bytes": 24 * 2**30})


def test_plan_packs_one_row_per_micro_batch_and_stops_length_grouping():
    from cpuft.planning.plan import PlanRequest, plan_for

    packed_plan = plan_for(_avx2_machine(), PlanRequest(packing=True))
    assert (packed_plan.packing, packed_plan.length_grouping, packed_plan.per_device_batch_size) == (True, False, 1)
    wide = plan_for(_avx2_machine(), PlanRequest(packing=True, per_device_batch_size=4))
    assert wide.per_device_batch_size == 4 and any("square" in w for w in wide.warnings)
    assert plan_for(_avx2_machine(), PlanRequest()).length_grouping is True


def test_plan_compiles_only_runs_long_enough_to_repay_the_warm_up():
    from cpuft.planning.plan import COMPILE_MIN_STEPS_CPU, PlanRequest, plan_for

    machine = _avx2_machine()
    assert plan_for(machine, PlanRequest(max_steps=60)).torch_compile is False
    assert plan_for(machine, PlanRequest(max_steps=-1)).torch_compile is False
    assert plan_for(machine, PlanRequest(max_steps=COMPILE_MIN_STEPS_CPU)).torch_compile is True
    assert plan_for(machine, PlanRequest(max_steps=60, torch_compile=True)).torch_compile is True
    assert plan_for(machine, PlanRequest(max_steps=10**6, torch_compile=False)).torch_compile is False


@pytest.mark.slow
def test_cpuft_sft_trains_with_packing(tiny_model_dir, tmp_path):
    import json

    from tests.conftest import run_cpuft

    out = tmp_path / "run"
    proc = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--max-steps", "2", "--packing",
                     "--max-length", "256", "--gradient-accumulation-steps", "2", "--output-dir", out, "--no-progress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert plan["packing"] is True and plan["per_device_batch_size"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_tokens"] > 0
