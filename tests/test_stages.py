"""`cpuft sft`'s stages called in this process, as the bench and a second job call them
(cpuft.train.sft): what each stage hands on, and that nothing is written before training starts.
The CLI around them is tested in tests/test_sft_cli.py."""

from __future__ import annotations

import json

from tests.conftest import random_chat_rows, write_jsonl


def _job(model_dir, data, run_dir, **keys):
    from cpuft.config.job import resolve_config

    values = dict(model=str(model_dir), dataset=str(data), output_dir=str(run_dir), max_steps=2,
                  per_device_batch_size=2, gradient_accumulation_steps=1, max_length=64, eval_fraction=0.2,
                  save_steps=100)
    return resolve_config(None, {**values, **keys})


def test_prepare_run_validates_and_loads_everything_and_writes_nothing(tiny_model_dir, tmp_path):
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.preflight import preflight
    from cpuft.train.sft import prepare_run

    data = write_jsonl(tmp_path / "chat.jsonl", random_chat_rows(1, 6, 12, count=20))
    run_dir = tmp_path / "run"
    job = _job(tiny_model_dir, data, run_dir)
    printed = []
    run = prepare_run(job, probe_machine(), log=printed.append)
    assert not run_dir.exists()  # validated and loaded; nothing written yet
    assert (len(run.data.train), len(run.data.eval)) == (16, 4)
    counts = run.data.loss_masks["train"]
    assert counts.conversations == 16 and 0 < counts.loss_tokens < counts.tokens  # replies only
    assert run.data.tokens_per_epoch > 0 and run.data.mean_tokens_per_row > 0
    # `cpuft plan` and the bench plan through the same preflight: the same plan for the same job.
    planned = preflight(job, run.machine).plan
    assert planned == run.plan
    assert any("compute_dtype" in line for line in printed)  # the plan table, before loading
    assert run.model_facts.num_layers == 2
    assert run.with_plan(fused_lora=False).plan.fused_lora is False and run.plan == planned  # a copy; run unchanged


def test_train_run_writes_the_run_directory_and_a_summary_that_reads_back(tiny_model_dir, tmp_path):
    from cpuft.hardware.probe import probe_machine
    from cpuft.run_dir import RunDir
    from cpuft.train.sft import prepare_run, train_run

    data = write_jsonl(tmp_path / "chat.jsonl", random_chat_rows(2, 6, 12, count=20))
    run_dir = tmp_path / "run"
    run = prepare_run(_job(tiny_model_dir, data, run_dir), probe_machine(), log=lambda *a, **k: None)
    result = train_run(run, show_progress=False, log=lambda *a, **k: None)
    assert result.status == "completed"
    summary = result.summary
    assert summary.steps == 2 and summary.train_rows == 16 and summary.eval_rows == 4
    assert summary.eval_loss is not None and summary.final_loss is not None
    assert RunDir(run_dir).read_summary() == summary  # the file holds what the run returned
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == 2 and on_disk["status"] == "completed"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "plan.json").read_text())["plan"] == json.loads(json.dumps(run.plan.to_dict()))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 in steps and 2 in steps
