"""What a terraform binary can check offline: formatting, and the provider-free VM plan module
(`terraform test`, and its rendered startup script). Skipped when no terraform is on PATH."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from infra_support import INFRA, PRICES, ROOT


def run(terraform: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([terraform, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fmt(terraform):
    proc = run(terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA), cwd=ROOT)
    assert proc.returncode == 0, f"run `terraform fmt -recursive infra`:\n{proc.stdout}{proc.stderr}"


def test_vm_plan_module_tests(terraform, tmp_path):
    # A copy, so that nothing terraform writes lands in the working tree.
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*", "*.tfplan"))
    prices = tmp_path / PRICES.relative_to(ROOT)  # read as ../cpuft/planning/ from infra/
    prices.parent.mkdir(parents=True)
    shutil.copy(PRICES, prices)
    proc = run(terraform, "test", "-no-color", cwd=copy / "modules" / "vm_plan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 failed" in proc.stdout


ROOT_MODULE = """
module "plan" {
  source            = "%(module)s"
  name              = "cpuft"
  cpuft_pip_spec    = "cpuft @ git+https://github.com/example/cpuft@v0.1.0"
  price_table_csv   = file("%(prices)s")
  gpu_vm            = true
  batch_mode        = "run"
  batch_queue_yaml  = "jobs: []"
  results_bucket    = "proj-cpuft-results"
}
output "cpu" { value = module.plan.vms.cpu.startup_script }
output "gpu" { value = module.plan.vms.gpu.startup_script }
output "shutdown" { value = module.plan.vms.cpu.shutdown_script }

module "recreate" {
  source                 = "%(module)s"
  name                   = "cpuft"
  cpuft_pip_spec         = "cpuft==0.1.0"
  price_table_csv        = file("%(prices)s")
  batch_mode             = "run"
  batch_queue_yaml       = "jobs: []"
  results_bucket         = "proj-cpuft-results"
  recreate_on_preemption = true
  max_total_hours        = 24
}
output "recreate" { value = module.recreate.vms.cpu.startup_script }

module "nodes" {
  source          = "%(module)s"
  name            = "cpuft"
  cpuft_pip_spec  = "cpuft==0.1.0"
  price_table_csv = file("%(prices)s")
  node_count      = 2
}
output "node" { value = module.nodes.vms["cpu-1"].startup_script }
"""

SCRIPTS = ("cpu", "gpu", "shutdown", "recreate", "node")


@pytest.fixture(scope="module")
def startup_scripts(terraform, tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("render")
    (work / "main.tf").write_text(
        ROOT_MODULE % {"module": INFRA / "modules" / "vm_plan", "prices": PRICES}
    )
    for args in (("init", "-input=false", "-no-color"), ("apply", "-auto-approve", "-input=false", "-no-color")):
        proc = run(terraform, *args, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    scripts = {}
    for role in SCRIPTS:
        proc = run(terraform, "output", "-raw", role, cwd=work)
        assert proc.returncode == 0, proc.stderr
        scripts[role] = proc.stdout
        (work / f"{role}.sh").write_text(proc.stdout)
    return scripts


@pytest.mark.parametrize("role", SCRIPTS)
def test_rendered_vm_scripts_are_valid_bash(startup_scripts, role, tmp_path):
    script = tmp_path / "startup.sh"
    script.write_text(startup_scripts[role])
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(ROOT / ".venv-infra/py/bin"))
    if shellcheck:
        proc = subprocess.run([shellcheck, "-S", "warning", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_startup_script_installs_pinned_cpu_torch_then_cpuft_and_starts_the_queue(startup_scripts):
    cpu = startup_scripts["cpu"]
    torch_at = cpu.index("'torch==2.13.0' --index-url 'https://download.pytorch.org/whl/cpu'")
    cpuft_at = cpu.index("pip install --quiet 'cpuft @ git+https://github.com/example/cpuft@v0.1.0'")
    assert torch_at < cpuft_at, "torch first, or pip pulls a CUDA build for cpuft's dependency"
    assert "systemd-run --unit=cpuft-batch" in cpu and "cpuft batch run /etc/cpuft/queue.yaml" in cpu
    assert 'gs://proj-cpuft-results/$(hostname)/$name' in cpu
    assert cpu.rstrip().endswith('echo "cpuft startup: ready $(date -Is)"')
    gpu = startup_scripts["gpu"]
    assert "pip install --quiet 'torch==2.13.0'\n" in gpu, "the GPU VM takes the CUDA build from PyPI"


def test_shutdown_script_saves_runs_to_the_bucket_within_the_preemption_notice(startup_scripts):
    shutdown = startup_scripts["shutdown"]
    assert shutdown.startswith("#!/bin/bash")
    assert "timeout 25" in shutdown, "Spot preemption leaves about 30 s"
    assert '"gs://proj-cpuft-results/$(hostname)/$(basename "$dir")"' in shutdown


# --- The recreated VM's queue runner, run for real with stand-ins for cpuft and gcloud --------


def heredoc(script: str, name: str) -> str:
    """The body of `cat > ... <<'NAME'` in a rendered startup script."""
    start = script.index(f"<<'{name}'\n") + len(name) + 5
    return script[start:script.index(f"\n{name}\n", start) + 1]


@pytest.fixture
def queue_vm(startup_scripts, tmp_path):
    """The runner and the group-deleting helper exactly as rendered, their absolute paths moved into
    tmp_path, with a `cpuft` that exits as told and a `gcloud` that records what it is asked."""
    script = startup_scripts["recreate"]
    root = tmp_path / "vm"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()

    def place(text: str) -> str:
        return text.replace("/usr/local/bin/", f"{root}/bin/").replace("/etc/cpuft/", f"{root}/etc/")

    for name, body in (("cpuft-run-queue", heredoc(script, "QUEUE")), ("cpuft-delete-own-group", heredoc(script, "DELETE"))):
        (root / "bin" / name).write_text(place(body))
        (root / "bin" / name).chmod(0o755)
    (root / "bin" / "cpuft").write_text(f'#!/bin/bash\necho "cpuft $*" >> {root}/calls\nsleep "${{FAKE_SECONDS:-0}}"\nexit "${{FAKE_EXIT:-0}}"\n')
    (root / "bin" / "gcloud").write_text(f'#!/bin/bash\necho "gcloud $*" >> {root}/calls\n')
    for tool in ("cpuft", "gcloud"):
        (root / "bin" / tool).chmod(0o755)

    def run_queue(exit_code: int, seconds_left: int, seconds_to_run: float = 0) -> tuple[int, list[str], str]:
        import time

        (root / "etc/group.env").write_text(
            f"CPUFT_GROUP=cpuft-cpu\nCPUFT_ZONE=us-central1-a\nCPUFT_DEADLINE={int(time.time()) + seconds_left}\n"
        )
        (root / "calls").unlink(missing_ok=True)
        env = {"PATH": f"{root}/bin:/usr/bin:/bin", "FAKE_EXIT": str(exit_code), "FAKE_SECONDS": str(seconds_to_run)}
        proc = subprocess.run([str(root / "bin/cpuft-run-queue")], capture_output=True, text=True, env=env, timeout=60)
        calls = (root / "calls").read_text().splitlines() if (root / "calls").exists() else []
        return proc.returncode, calls, proc.stdout + proc.stderr

    return run_queue


def test_a_drained_queue_deletes_the_group(queue_vm):
    code, calls, out = queue_vm(exit_code=0, seconds_left=3600)
    assert code == 0, out
    batch, delete = calls
    assert batch.startswith("cpuft batch run ") and batch.endswith(
        "/queue.yaml --state-dir /var/lib/cpuft/batch --sync-to gs://proj-cpuft-results/queues/cpuft"
    )
    assert delete == "gcloud compute instance-groups managed delete cpuft-cpu --zone us-central1-a --quiet"
    assert "the queue is drained" in out


def test_an_interrupted_queue_leaves_the_group_to_recreate_the_vm(queue_vm):
    code, calls, out = queue_vm(exit_code=75, seconds_left=3600)
    assert code == 75
    assert not any(c.startswith("gcloud") for c in calls), "a preempted VM must come back, not delete its group"


def test_a_queue_that_refuses_its_input_deletes_the_group(queue_vm):
    code, calls, out = queue_vm(exit_code=2, seconds_left=3600)
    assert calls[-1].startswith("gcloud compute instance-groups managed delete cpuft-cpu")
    assert "exited 2" in out


def test_the_deadline_stops_the_queue_and_deletes_the_group(queue_vm):
    # Two seconds left, a job that would run for a minute: timeout ends it at the deadline.
    code, calls, out = queue_vm(exit_code=0, seconds_left=2, seconds_to_run=60)
    assert calls[-1].startswith("gcloud compute instance-groups managed delete cpuft-cpu")
    assert "24 h are up" in out


def test_recreated_vm_checks_its_deadline_before_installing(startup_scripts):
    script = startup_scripts["recreate"]
    assert script.index("instance-groups managed describe 'cpuft-cpu'") < script.index("pip install")
    assert "systemd-run --unit=cpuft-batch --working-directory=\"$state\" /usr/local/bin/cpuft-run-queue" in script


def test_a_node_reads_its_rank_from_metadata_and_pins_the_ephemeral_ports(startup_scripts):
    node = startup_scripts["node"]
    for key in ("cpuft-node-rank", "cpuft-node-count", "cpuft-rdzv-endpoint"):
        assert f"$(metadata attributes/{key})" in node
    assert 'sysctl -q -w net.ipv4.ip_local_port_range="32768 60999"' in node
    assert "CPUFT_NODE_RANK" in node and "instance-groups" not in node
