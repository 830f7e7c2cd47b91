"""`cpuft env`: what this machine is (container limits included) and what cpuft would plan for it,
as a table or JSON; `--machine FILE` plans for a described machine instead of probing this one."""

from __future__ import annotations

import json
from pathlib import Path

from cpuft.config.choices import DeviceRequest, DtypeRequest, QuantRequest, values
from cpuft.errors import UserError
from cpuft.hardware.probe import Machine, probe_machine
from cpuft.planning.plan import PlanRequest, plan_for
from cpuft.planning.report import format_env_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="show machine facts and the plan cpuft would use",
        description="Probe CPU features (AMX, AVX-512, AVX2), cores, NUMA, RAM and CUDA GPUs, and"
        " print the training plan cpuft would choose, with the reason for each choice.",
    )
    parser.add_argument("--json", action="store_true", help="print {'machine': ..., 'plan': ...} as JSON")
    parser.add_argument("--device", default="auto", choices=values(DeviceRequest), help="device request")
    parser.add_argument("--dtype", default="auto", choices=values(DtypeRequest), help="dtype request")
    parser.add_argument("--quant", default="auto", choices=values(QuantRequest), help="quantisation request")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    parser.add_argument(
        "--machine", metavar="FILE", default=None,
        help="plan for the machine described in FILE (the 'machine' object of `cpuft env --json`)"
        " instead of probing this one",
    )
    parser.set_defaults(handler=run)


def load_machine_file(path: str) -> Machine:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"machine file {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    data = data.get("machine", data)
    try:
        return Machine.from_dict(data)
    except TypeError as exc:
        raise UserError(f"{path}: not a machine description ({exc}).") from None


def run(args) -> int:
    machine = load_machine_file(args.machine) if args.machine else probe_machine()
    request = PlanRequest(device=args.device, dtype=args.dtype, quant=args.quant, threads=args.threads)
    plan = plan_for(machine, request)
    if args.json:
        print(json.dumps({"machine": machine.to_dict(), "plan": plan.to_dict()}, indent=2))
    else:
        print(format_env_table(machine, plan))
    return 0
