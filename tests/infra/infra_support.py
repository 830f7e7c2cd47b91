"""Paths and helpers shared by the infrastructure tests (fixtures live in conftest.py)."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# One price table for Terraform and `cpuft plan`: it ships inside the package.
PRICES = ROOT / "cpuft" / "planning" / "gcp_prices.csv"
SCRIPTS = ROOT / "scripts" / "gcp"
VAR_FILES = {
    "default": "examples/minimal.tfvars",
    "all-features": "examples/all-features.tfvars",
}


def resources(config: dict, rtype: str) -> list[dict]:
    """The resources (not data sources) of one type in a tfparse result."""
    return [r for r in config.get(rtype, []) if r.get("__tfmeta", {}).get("type") == "resource"]


def outputs(config: dict) -> dict:
    """Root module outputs by name."""
    return {o["__tfmeta"]["label"]: o.get("value") for o in config["output"] if o["__tfmeta"]["path"].startswith("output.")}


class FakeCompute:
    """gcplocal's Compute Engine fake on 127.0.0.1, patched to behave like the real API where
    cpuft's code depends on it:

    - operation ids are numbers (gcplocal makes hex ones; google-cloud-compute parses uint64);
    - aggregatedList exists for instances and disks (gcplocal has per-zone lists only);
    - an inserted instance keeps every field of the request (shieldedInstanceConfig, ...);
    - inserting an instance creates its boot disk from initializeParams, labelled and attached,
      and deleting the instance deletes its autoDelete disks, as Compute Engine does.

    gcplocal's CLI binds 0.0.0.0; this binds loopback only.
    """

    def __init__(self):
        import re
        import threading

        from flask import jsonify, request
        from gcplocal.server import create_app
        from gcplocal.state import StateStore
        from werkzeug.serving import make_server

        class NumericOperations(StateStore):
            def create_operation(self, *args, **kwargs):
                operation = super().create_operation(*args, **kwargs)
                operation["id"] = str(int(operation["id"], 16))  # same dict as the stored one
                return operation

        self.state = state = NumericOperations()
        app = create_app(state)

        def aggregated(project: str, kind: str):
            prefix = f"compute/{project}/{kind}/"
            items: dict[str, dict] = {}
            with state._lock:
                keys = [k for k in state._resources if k.startswith(prefix)]
            for key in keys:
                zone, name = key[len(prefix):].split("/", 1)
                resource = state.get("compute", project, f"{kind}/{zone}", name)
                items.setdefault(f"zones/{zone}", {kind: []})[kind].append(resource)
            return jsonify({"kind": f"compute#{kind[:-1]}AggregatedList", "items": items})

        app.add_url_rule(
            "/compute/v1/projects/<project>/aggregated/instances", "agg_instances",
            lambda project: aggregated(project, "instances"),
        )
        app.add_url_rule(
            "/compute/v1/projects/<project>/aggregated/disks", "agg_disks",
            lambda project: aggregated(project, "disks"),
        )

        instance_path = re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instances(?:/([^/]+))?$")

        @app.after_request
        def like_compute_engine(response):
            match = instance_path.match(request.path)
            if not match or response.status_code != 200:
                return response
            project, zone, name = match.groups()
            if request.method == "POST" and name is None:
                body = request.get_json(silent=True) or {}
                instance = state.get("compute", project, f"instances/{zone}", body["name"])
                # gcplocal keeps a fixed set of fields; Compute Engine keeps them all.
                for key, value in body.items():
                    instance.setdefault(key, value)
                state.put("compute", project, f"instances/{zone}", body["name"], instance)
                for disk in body.get("disks", []):
                    params = disk.get("initializeParams") or {}
                    if disk.get("boot") and params:
                        self.put_disk(
                            project, zone, disk.get("deviceName") or body["name"], labels=params.get("labels", {}),
                            users=[instance["selfLink"]], auto_delete=disk.get("autoDelete", False),
                        )
            elif request.method == "DELETE" and name:
                for disk in state.list("compute", project, f"disks/{zone}"):
                    if any(u.endswith(f"/instances/{name}") for u in disk.get("users", [])):
                        if disk.get("_autoDelete"):
                            state.delete("compute", project, f"disks/{zone}", disk["name"])
                        else:
                            disk["users"] = []
                            state.put("compute", project, f"disks/{zone}", disk["name"], disk)
            return response

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def put_disk(self, project, zone, name, *, labels, users=(), auto_delete=False, created=None):
        from gcplocal.utils import timestamp_now

        self.state.put("compute", project, f"disks/{zone}", name, {
            "kind": "compute#disk", "id": str(abs(hash((project, zone, name))) % 10**18), "name": name,
            "zone": f"projects/{project}/zones/{zone}", "sizeGb": "200", "status": "READY",
            "labels": dict(labels), "users": list(users), "_autoDelete": auto_delete,
            "selfLink": f"{self.url}/compute/v1/projects/{project}/zones/{zone}/disks/{name}",
            "creationTimestamp": created or timestamp_now(),
        })

    def edit_instance(self, project, zone, name, **fields):
        """Change what only time or Google would change: creationTimestamp, status."""
        instance = self.state.get("compute", project, f"instances/{zone}", name)
        instance.update(fields)
        self.state.put("compute", project, f"instances/{zone}", name, instance)

    def instances(self, project):
        return sorted(
            (zone_key.split("/")[-2], r["name"])
            for zone_key, r in ((k, self.state._resources[k]) for k in list(self.state._resources))
            if zone_key.startswith(f"compute/{project}/instances/")
        )

    def disks(self, project):
        return sorted(
            r["name"] for k, r in list(self.state._resources.items()) if k.startswith(f"compute/{project}/disks/")
        )

    def reset(self):
        self.state.clear()

    def close(self):
        self._server.shutdown()
