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
"""


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
    for role in ("cpu", "gpu", "shutdown"):
        proc = run(terraform, "output", "-raw", role, cwd=work)
        assert proc.returncode == 0, proc.stderr
        scripts[role] = proc.stdout
        (work / f"{role}.sh").write_text(proc.stdout)
    return scripts


@pytest.mark.parametrize("role", ["cpu", "gpu", "shutdown"])
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
