"""report_to's integrations (cpuft.config.choices.ReportIntegration): their names as transformers
takes them, and the checks that stop a job whose integration could not start.

transformers' callbacks refuse to start without their package, and trackio waits on a Hub Space,
only once the trainer starts, after the run directory is written; `check_report_integrations`
makes those checks up front. How each integration runs offline is cpuft.train.trainer_args'.
"""

from __future__ import annotations

from cpuft.errors import UserError

# The pip package each reporting integration needs (transformers' callback refuses to start
# without it, after the run directory is written).
REPORTING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def report_integration_names(value) -> list[str]:
    """report_to as transformers takes it: a list of integration names ('none' alone: none)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip().lower() for item in items if str(item).strip()] or ["none"]


def check_report_integrations(config, origins: dict[str, str]) -> None:
    """Every integration in report_to is installed, and none would need the network offline."""
    import importlib.util
    import os

    from huggingface_hub import is_offline_mode

    where = origins.get("report_to", "report_to (default)")
    names = report_integration_names(config.report_to)
    for name in names:
        package = REPORTING_PACKAGES.get(name)
        if package and importlib.util.find_spec(package.replace("-", "_")) is None:
            raise UserError(f"{where}: report_to {name} needs the '{package}' package, which is not installed:"
                            f" `pip install {package}`, or choose another report_to (none turns reporting off).")
    space = config.trl_args.get("trackio_space_id") or os.environ.get("TRACKIO_SPACE_ID")
    if "trackio" in names and space and is_offline_mode():
        raise UserError(f"{origins.get('trackio_space_id', 'TRACKIO_SPACE_ID')}: trackio logs to the Hub Space"
                        f" {space!r}, but HF_HUB_OFFLINE is set: unset the Space to log locally.")
