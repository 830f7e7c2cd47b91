"""A hostile but realistic user against `cpuft sft`'s run directory: resumes at and past the last
step, late-found bad values, a loss that turns NaN mid-run, output paths that cannot be written,
corrupted checkpoints and an alias bomb of a config file.

Every case ends one of three ways, and the test checks which and that nothing on disk was lost:
exit 2 naming the field or file, with nothing written; exit 1 with one clean message and the last
good checkpoint kept; or exit 0 with the uninterrupted run's adapter (a finished run left byte for
byte as it was).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from cpuft.checkpoints import checkpoint_problem, newest_complete_checkpoint
from cpuft.cli import main
from cpuft.errors import UserError
from tests.conftest import run_cpuft
from tests.test_batch_preemption import max_abs_difference

STEPS = 3
JOB_FLAGS = ("--dataset", "sample", "--max-samples", "24", "--max-steps", str(STEPS), "--save-steps", "1",
             "--lora-dropout", "0", "--no-progress")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--output-dir", run_dir, *JOB_FLAGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: equal digests mean nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def killed_before_its_adapter(finished_run: Path, where: Path) -> Path:
    """The run as a kill right after its last checkpoint leaves it: no adapter/, no summary.json."""
    shutil.copytree(finished_run, where)
    shutil.rmtree(where / "adapter")
    (where / "summary.json").unlink()
    return where


# ----------------------------------------------------------------------------- resume at the end


def test_resume_of_a_finished_run_reports_it_and_changes_nothing(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = tree_digest(run_dir)
    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"is already finished ({STEPS} steps)" in result.stdout
    assert tree_digest(run_dir) == before
    assert not (run_dir / f"checkpoint-{STEPS + 1}").exists()


def test_resume_from_the_last_checkpoint_trains_nothing_and_gives_the_uninterrupted_adapter(finished_run, tmp_path):
    run_dir = killed_before_its_adapter(finished_run, tmp_path / "run")
    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to train" in result.stdout
    assert not (run_dir / f"checkpoint-{STEPS + 1}").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["steps"], summary["steps_this_run"]) == ("completed", STEPS, 0)
    # The checkpoint's weights, bit for bit: no step max_steps + 1 was taken.
    assert max_abs_difference(run_dir / "adapter", finished_run / "adapter") == 0.0


def test_a_higher_max_steps_continues_a_finished_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", str(STEPS + 2), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (STEPS + 2, 2)
    logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(1, STEPS + 3))  # the new steps, each logged once


def test_batch_run_records_a_job_killed_after_its_last_checkpoint_as_done_with_its_steps(finished_run, tiny_model_dir, tmp_path):
    run_dir = killed_before_its_adapter(finished_run, tmp_path / "runs" / "late")
    queue = tmp_path / "queue.yaml"
    queue.write_text(textwrap.dedent(f"""\
        jobs:
          - name: late
            model: {tiny_model_dir}
            dataset: sample
            max_samples: 24
            max_steps: {STEPS}
            save_steps: 1
            lora_dropout: 0.0
            output_dir: {run_dir}
        """))
    result = run_cpuft("batch", "run", queue)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    status = run_cpuft("batch", "status", queue, "--json")
    (job,) = json.loads(status.stdout)["jobs"]
    assert (job["state"], job["summary"]["steps"], job["summary"]["max_steps"]) == ("done", STEPS, STEPS)
    assert not (run_dir / f"checkpoint-{STEPS + 1}").exists()


# ----------------------------------------------------------------------------- corrupted checkpoints


def corrupt(checkpoint: Path, how: str) -> None:
    if how == "truncated adapter":
        path = checkpoint / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "truncated optimizer":
        path = checkpoint / "optimizer.pt"
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "state is a list":
        (checkpoint / "trainer_state.json").write_text("[]")
    elif how == "bit flip in optimizer":
        path = checkpoint / "optimizer.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated adapter", "truncated optimizer", "state is a list", "bit flip in optimizer"])
def test_a_corrupt_checkpoint_is_not_complete(finished_run, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / f"checkpoint-{STEPS}"
    assert checkpoint_problem(last) is None
    corrupt(last, how)
    assert checkpoint_problem(last) is not None
    complete, incomplete = newest_complete_checkpoint(run_dir)
    assert complete == run_dir / f"checkpoint-{STEPS - 1}" and incomplete == [last]


def test_resume_sets_a_corrupt_checkpoint_aside_and_continues_from_the_one_before(finished_run, tmp_path):
    run_dir = killed_before_its_adapter(finished_run, tmp_path / "run")
    corrupt(run_dir / f"checkpoint-{STEPS}", "truncated adapter")
    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {run_dir / f'checkpoint-{STEPS - 1}'}" in result.stdout
    assert "adapter_model.safetensors: cut short" in result.stderr and "Traceback" not in result.stderr
    assert len(list(run_dir.glob(f"incomplete-checkpoint-{STEPS}-*"))) == 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    # lora_dropout 0 and the same machine: step 3 redone gives the uninterrupted adapter.
    assert max_abs_difference(run_dir / "adapter", finished_run / "adapter") <= 1e-6


def test_resume_with_every_checkpoint_corrupt_is_refused_and_nothing_is_moved(finished_run, tmp_path):
    run_dir = killed_before_its_adapter(finished_run, tmp_path / "run")
    for checkpoint in run_dir.glob("checkpoint-*"):
        corrupt(checkpoint, "state is a list")
    before = tree_digest(run_dir)
    assert main(["sft", "--output-dir", str(run_dir), "--resume", "--no-progress"]) == 2
    assert tree_digest(run_dir) == before


# ----------------------------------------------------------------------------- bad values, found first


@pytest.mark.parametrize("flags, field", [
    (("--learning-rate", "-0.01"), "learning_rate"),
    (("--learning-rate", "nan"), "learning_rate"),
    (("--learning-rate", "inf"), "learning_rate"),
    (("--max-steps", "-1", "--num-train-epochs", "-1"), "num_train_epochs"),
    (("--max-steps", "-1", "--num-train-epochs", "0"), "num_train_epochs"),
    (("--per-device-batch-size", "0"), "per_device_batch_size"),
    (("--gradient-accumulation-steps", "0"), "gradient_accumulation_steps"),
    (("--max-grad-norm", "nan"), "max_grad_norm"),
    (("--weight-decay", "-1"), "weight_decay"),
    (("--lora-dropout", "1.0"), "lora_dropout"),
])
def test_a_nonsense_value_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys, flags, field):
    run_dir = tmp_path / "run"
    assert main(["sft", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(run_dir), *flags]) == 2
    error = capsys.readouterr().err
    assert field in error and "Traceback" not in error
    assert not run_dir.exists()


def test_a_nan_in_a_yaml_config_is_refused_by_sft_and_batch_check(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: sample\nlearning_rate: .nan\n")
    run_dir = tmp_path / "run"
    assert main(["sft", "--config", str(config), "--output-dir", str(run_dir)]) == 2
    assert f"{config}:3" in capsys.readouterr().err and not run_dir.exists()
    queue = tmp_path / "queue.yaml"
    queue.write_text(f"jobs:\n  - name: bad\n    model: {tiny_model_dir}\n    dataset: sample\n    learning_rate: .nan\n")
    assert main(["batch", "check", str(queue)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tiny_model_dir, tmp_path, capsys):
    lines = [f"model: {tiny_model_dir}", "dataset: sample", 'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines.append(f"modules_to_save: [{', '.join(['*a8'] * 9)}]")  # 9**10 values once expanded
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    assert main(["sft", "--config", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert str(config) in error and "alias" in error
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- output paths


def test_an_output_path_that_is_a_file_or_under_one_is_refused(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    for output in (a_file, a_file / "run"):
        assert main(["sft", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(output)]) == 2
        error = capsys.readouterr().err
        assert f"{a_file} is a file" in error or f"{output} is a file" in error
    assert a_file.read_text() == "keep me\n"


def read_only_mount() -> Path | None:
    """A directory on a filesystem mounted read-only on this machine, if there is one."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and "ro" in fields[3].split(",") and Path(fields[1]).is_dir():
            return Path(fields[1])
    return None


@pytest.mark.skipif(read_only_mount() is None, reason="no read-only filesystem is mounted here")
def test_an_output_directory_on_a_read_only_filesystem_is_refused(tiny_model_dir, capsys):
    output = read_only_mount() / "cpuft-run"
    assert main(["sft", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(output)]) == 2
    assert "read-only filesystem" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a run that goes NaN


def test_weights_that_turn_nan_stop_the_run_keeping_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    # A learning rate of 1e30 is finite, so it passes validation, and overflows within a few steps.
    result = run_cpuft("sft", "--model", tiny_model_dir, "--output-dir", run_dir, "--dataset", "sample",
                       "--max-samples", "24", "--max-steps", "8", "--save-steps", "1", "--learning-rate", "1e30",
                       "--lr-scheduler-type", "constant", "--warmup-steps", "0", "--save-total-limit", "100",
                       "--no-progress")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights turned NaN/inf" in result.stderr
    failed_step = int(result.stderr.split("the run failed: step ")[1].split(":")[0])
    assert 1 <= failed_step <= 8
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert saved == list(range(1, failed_step))  # every step before the failure, not the failed one
    for step in saved:
        weights = load_file(run_dir / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(t.float().isfinite().all() for t in weights.values())
    if saved:
        assert f"checkpoint-{saved[-1]}, is kept" in result.stderr


# ----------------------------------------------------------------------------- resume on another world size


def test_a_resume_on_fewer_ranks_keeps_the_runs_global_batch(tiny_model_dir, tmp_path):
    from cpuft.config.job import SFTJobConfig
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.preflight import preflight
    from cpuft.run_dir import RunDir
    from cpuft.train.resume import keep_global_batch

    # The plan.json a 2-rank run wrote, with micro-batches of 2 and 4 accumulation: 16 rows a step.
    run_dir = RunDir(tmp_path)
    run_dir.plan_file.write_text(json.dumps({"plan": {"global_batch_size": 16, "world_size": 2}}))
    machine = probe_machine()
    one_process = preflight(SFTJobConfig(model=str(tiny_model_dir), per_device_batch_size=2), machine)
    job = SFTJobConfig(model=str(tiny_model_dir), per_device_batch_size=2)
    kept = keep_global_batch(one_process, run_dir, job, print)
    assert (kept.plan.per_device_batch_size, kept.plan.gradient_accumulation_steps, kept.plan.global_batch_size) == (2, 8, 16)
    assert "16" in kept.plan.reasons["batch"]
    # Batch flags that give another global batch, or one no whole accumulation reaches, are refused.
    fixed = SFTJobConfig(model=str(tiny_model_dir), per_device_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(UserError, match="global batch is 16"):
        keep_global_batch(preflight(fixed, machine), run_dir, fixed, print)
    odd = SFTJobConfig(model=str(tiny_model_dir), per_device_batch_size=3)
    with pytest.raises(UserError, match="global batch is 16"):
        keep_global_batch(preflight(odd, machine), run_dir, odd, print)


# ----------------------------------------------------------------------------- the Hub unreachable


def test_plan_without_a_dataset_does_not_wait_on_an_unreachable_hub(tiny_model_dir):
    import os
    import subprocess
    import sys

    # Offline mode not set, and the Hub's endpoint a closed local port: the datasets client would
    # retry for ~20 s before giving up.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = subprocess.run([sys.executable, "-m", "cpuft", "plan", "--model", str(tiny_model_dir)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cannot be reached from here; pass --dataset FILE or --tokens N" in result.stdout
