"""What a user of the Hugging Face stack expects from `cpuft sft` (issue 14 item 6): --revision,
--trust-remote-code, --report-to (offline-safe), evaluation during training with the best
checkpoint kept, and early stopping. Training runs go through the real CLI in a subprocess on the
tiny test model; refusals that the config check makes are asserted on it directly (a UserError
is exit 2 before anything is written: one CLI refusal below shows that end to end)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cpuft.config.job import resolve_config
from cpuft.errors import UserError
from tests.conftest import run_cpuft

# 40 sample rows: 8 held out at eval_fraction 0.2, so an evaluation takes a moment.
FAST = ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "1", "--max-length", "96",
        "--max-samples", "40", "--no-progress"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_refused(result, out: Path, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]
    assert not out.exists(), "nothing may be written for refused input"


# ----------------------------------------------------------------------------- revisions


def test_a_revision_for_a_local_model_directory_is_refused(tiny_model_dir):
    """Refused rather than ignored: a local directory has no revisions, and a run that ignored
    it would record (config.yaml, summary.json, adapter_config.json) a version it never used."""
    with pytest.raises(UserError, match=r"^--revision: revision 'v1.0' is for a Hub model, .* is a local directory,"
                                        r" which has no revisions"):
        resolve_config(None, {"model": str(tiny_model_dir), "revision": "v1.0"})
    hub = resolve_config(None, {"model": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "v1.0"})
    assert hub.to_dict()["revision"] == "v1.0"  # config.yaml keeps it for --resume
    from cpuft.config.peft_config import peft_config_kwargs

    assert peft_config_kwargs(hub, total_steps=10)[0]["revision"] == "v1.0"  # adapter_config.json records it


def test_a_dataset_revision_for_a_local_file_is_refused(tmp_path):
    from cpuft.data.readers import load_rows

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hello"}\n')
    for source in ("sample", str(data), str(tmp_path / "missing.jsonl")):
        with pytest.raises(UserError, match=r"dataset_revision 'main' is for a Hub dataset.* no revisions"):
            load_rows(source, "train", revision="main")
    assert len(load_rows(str(data), "train")) == 1


# ----------------------------------------------------------------------------- remote code


@pytest.fixture(scope="module")
def remote_code_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, re-labelled as an architecture transformers does not know: its config and
    model classes live in .py files of the model directory, reached through auto_map."""
    import shutil

    model_dir = tmp_path_factory.mktemp("models") / "custom"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "configuration_cpuft_test.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class CpuftTestConfig(LlamaConfig):\n    model_type = 'cpuft_test'\n"
    )
    (model_dir / "modeling_cpuft_test.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_cpuft_test import CpuftTestConfig\n\n\n"
        "class CpuftTestForCausalLM(LlamaForCausalLM):\n    config_class = CpuftTestConfig\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="cpuft_test", architectures=["CpuftTestForCausalLM"], auto_map={
        "AutoConfig": "configuration_cpuft_test.CpuftTestConfig",
        "AutoModelForCausalLM": "modeling_cpuft_test.CpuftTestForCausalLM",
    })
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


@pytest.mark.slow
def test_a_model_with_its_own_code_needs_trust_remote_code(remote_code_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # transformers copies the code there
    out = tmp_path / "run"
    args = ["sft", "--model", remote_code_model, "--dataset", "sample", "--max-steps", "2", "--eval-fraction", "0",
            "--output-dir", out, *FAST]
    refused = run_cpuft(*args, stdin="y\n")  # never a prompt: transformers asks on stdin when given None
    _assert_refused(refused, out, "needs its own Python code", "--trust-remote-code")
    assert "Python code from the repository" not in refused.stderr

    trained = run_cpuft(*args, "--trust-remote-code")
    assert trained.returncode == 0, trained.stderr[-3000:]
    warnings = [line for line in trained.stderr.splitlines() if "will run on this machine" in line]
    assert len(warnings) == 1 and "--trust-remote-code" in warnings[0] and str(remote_code_model) in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trust_remote_code"] is True
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "trust_remote_code: true" in (out / "config.yaml").read_text()  # --resume trusts it again


# ----------------------------------------------------------------------------- report_to


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_exits_2_naming_the_package(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--report-to", "tensorboard,wandb",
                       "--max-steps", "1", "--output-dir", out, *FAST)
    _assert_refused(result, out, "--report-to: report_to wandb needs the 'wandb' package", "pip install wandb")


@pytest.mark.parametrize("integration", ["mlflow", "trackio"])
def test_report_to_other_missing_integrations_names_their_package(integration):
    if importlib.util.find_spec(integration) is not None:
        pytest.skip(f"{integration} is installed here")
    with pytest.raises(UserError, match=f"needs the '{integration}' package.*`pip install {integration}`"):
        resolve_config(None, {"report_to": integration})


def test_report_to_takes_a_comma_list_or_a_yaml_list_of_known_names(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("report_to: [tensorboard]\n")
    assert resolve_config(str(path), {}).report_to == "tensorboard"
    assert resolve_config(None, {"report_to": "None"}).report_to == "none"
    with pytest.raises(UserError, match=r"'tensorbord' is not one cpuft sets up; choose from tensorboard, wandb,"
                                        r" mlflow, trackio, none"):
        resolve_config(None, {"report_to": "tensorbord"})
    with pytest.raises(UserError, match="'none' cannot be combined"):
        resolve_config(None, {"report_to": "none,tensorboard"})


def test_offline_integrations_get_their_local_modes(tmp_path):
    from cpuft.train.trainer_args import reporting_environment

    unreachable, reachable = (lambda url: False), (lambda url: True)
    env, notes = reporting_environment("wandb,mlflow", tmp_path, {}, False, unreachable)
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(tmp_path)
    assert env["MLFLOW_TRACKING_URI"] == f"file:{tmp_path.resolve() / 'mlruns'}"
    assert any("api.wandb.ai is unreachable" in note for note in notes)
    # Online with a reachable server: wandb as configured; what the user set is kept.
    assert reporting_environment("wandb", tmp_path, {}, False, reachable) == ({}, [])
    user_set = {"WANDB_MODE": "online", "MLFLOW_TRACKING_URI": "http://m:5000"}
    assert reporting_environment("wandb,mlflow", tmp_path, user_set, False, unreachable) == ({}, [])
    env, notes = reporting_environment("wandb", tmp_path, {}, True, reachable)  # HF_HUB_OFFLINE=1
    assert env["WANDB_MODE"] == "offline" and "HF_HUB_OFFLINE is set" in notes[0]
    assert reporting_environment("tensorboard", tmp_path, {}, True, unreachable) == ({}, [])


# ----------------------------------------------------------------------------- evaluation during training


@pytest.mark.slow
def test_eval_steps_keeps_the_best_checkpoint_as_the_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # A high learning rate makes the eval loss move a lot between evaluations.
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--max-steps", "6",
                       "--eval-steps", "2", "--eval-fraction", "0.2", "--learning-rate", "0.05",
                       "--report-to", "none", "--output-dir", out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = {r["step"]: r["eval_loss"] for r in _records(out) if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6] and len([r for r in _records(out) if "eval_loss" in r]) == 3
    summary = json.loads((out / "summary.json").read_text())
    best_step = min(evals, key=evals.get)
    assert summary["best_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert summary["best_eval_loss"] == evals[best_step] == min(evals.values()) == summary["eval_loss"]
    assert summary["adapter_is_best_checkpoint"] is True and summary["stopped_early"] is False
    assert "save_steps: 2" in (out / "config.yaml").read_text()  # checkpoints follow the evaluations
    # adapter/ holds the best checkpoint's weights, whichever step that was.
    best = load_file(out / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert best.keys() == saved.keys() and all((best[k] == saved[k]).all() for k in best)
    assert not (out / "tensorboard").exists()  # --report-to none
    assert "best checkpoint: " in result.stdout


def test_eval_steps_without_held_out_rows_names_both_keys():
    with pytest.raises(UserError, match=r"^--eval-steps: .*eval_fraction is 0: set eval_fraction above 0"):
        resolve_config(None, {"eval_steps": "2", "eval_fraction": "0"})
    with pytest.raises(UserError, match=r"^--early-stopping-patience: .*set eval_steps too"):
        resolve_config(None, {"early_stopping_patience": "2"})


def test_save_steps_follow_eval_steps_or_are_refused_with_the_fix(tmp_path):
    assert resolve_config(None, {"eval_steps": "5"}).save_steps == 5  # unset: follows the evaluations
    assert resolve_config(None, {"eval_steps": "5", "save_steps": "20"}).save_steps == 20  # a multiple: kept
    path = tmp_path / "job.yaml"
    path.write_text("eval_steps: 4\nsave_steps: 6\n")
    with pytest.raises(UserError, match=rf"^{path}:2: save_steps 6 is not a multiple of eval_steps 4.*Set save_steps to 8"):
        resolve_config(str(path), {})
    # Without loading the best checkpoint at the end, any save_steps will do.
    assert resolve_config(None, {"eval_steps": "4", "save_steps": "6", "load_best_model_at_end": "false"}).save_steps == 6


@pytest.mark.slow
def test_early_stopping_ends_the_run_at_the_first_evaluation_that_is_not_better_enough(tiny_model_dir, tmp_path):
    """Patience 1 with a threshold of 1.0: an evaluation counts as better only when its loss is
    more than 1.0 below the best so far. The tiny model's eval loss moves by hundredths per step
    (it starts near ln(1024) = 6.93, and on it even lr 1.0 does not reliably push the loss up),
    so the second evaluation is not better enough and the run stops there, at step 2 of 6."""
    out = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--max-steps", "6",
                       "--eval-steps", "1", "--eval-fraction", "0.2", "--early-stopping-patience", "1",
                       "--early-stopping-threshold", "1.0", "--output-dir", out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    evals = [r["eval_loss"] for r in _records(out) if "eval_loss" in r]
    assert len(evals) == 2 and abs(evals[1] - evals[0]) < 1.0
    assert summary["steps"] == 2 and summary["max_steps"] == 6 and summary["stopped_early"] is True
    # The best checkpoint is still the lowest eval loss: the threshold only decides when to stop.
    assert summary["best_checkpoint"] == str(out / f"checkpoint-{1 + evals.index(min(evals))}")
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))  # report_to's default
    assert "early stopping" in result.stdout
