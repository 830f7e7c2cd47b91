"""Load a SkyPilot task file with SkyPilot's own loader and print what it understood, as JSON.

Run by tests/infra/test_skypilot.py with the interpreter of .venv-infra/sky (SkyPilot is never
imported by the test process itself). Usage: python skypilot_load.py TASK.yaml [KEY=VALUE ...]

Offline limits: SkyPilot checks an instance type against its GCP catalog, which it downloads; so
``resources`` is validated by SkyPilot's resources schema and built into a sky.Resources without
``instance_type``, and the instance type is reported for the test to compare with infra/.
"""

from __future__ import annotations

import json
import sys

import yaml


def main() -> int:
    import sky
    from sky.utils import common_utils, schemas

    path, *pairs = sys.argv[1:]
    overrides = [tuple(pair.split("=", 1)) for pair in pairs]
    with open(path) as handle:
        config = yaml.safe_load(handle)
    resources = config.pop("resources")
    try:
        common_utils.validate_schema(resources, schemas.get_resources_schema(), "Invalid resources: ")
        instance_type = resources.pop("instance_type")
        (built,) = sky.Resources.from_yaml_config(resources)
        task = sky.Task.from_yaml_config(config, env_overrides=overrides)
    except Exception as exc:  # what a user of `sky jobs launch` would be told
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    print(json.dumps({
        "name": task.name,
        "cloud": str(built.cloud),
        "use_spot": built.use_spot,
        "disk_size": built.disk_size,
        "job_recovery": built.job_recovery,
        "instance_type": instance_type,
        "envs": task.envs,
        "file_mounts": task.file_mounts,
        "num_nodes": task.num_nodes,
        "setup": task.setup,
        "run": task.run,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
