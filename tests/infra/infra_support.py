"""Paths and helpers shared by the infrastructure tests (fixtures live in conftest.py)."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# The one price table: shipped with the Python package, and infra/main.tf's default.
PRICES = ROOT / "cpuft" / "planning" / "gcp_prices.csv"
SCRIPTS = ROOT / "scripts" / "gcp"
VAR_FILES = {
    "default": "examples/minimal.tfvars",
    "all-features": "examples/all-features.tfvars",
    # Each VM as a managed instance group of size 1 (excludes plain VMs, so a var file of its own).
    "recreate": "examples/recreate.tfvars",
    # Two nodes of one job (excludes a batch queue, so a var file of its own).
    "multi-node": "examples/multi-node.tfvars",
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
      and deleting the instance deletes its autoDelete disks, as Compute Engine does;
    - instance templates (global) and zonal managed instance groups, which gcplocal lacks, written
      here after Compute Engine's documented behaviour (not checked against the real API): a group
      creates targetSize VMs from its template, named BASE-xxxx, with created-by metadata naming
      the group; a member VM deleted through the instances API is replaced by a new one (the group
      keeps its target size); deleting the group deletes its VMs and their disks.

    gcplocal's CLI binds 0.0.0.0; this binds loopback only.
    """

    PROJECT_NUMBER = "123456789012"

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

        self._make_group_routes(app)

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
                self._drop_disks_of(project, zone, name)
                for group in state.list("compute", project, f"instanceGroupManagers/{zone}"):
                    if name in group["_members"]:  # the group notices and makes a new VM
                        group["_members"].remove(name)
                        state.put("compute", project, f"instanceGroupManagers/{zone}", group["name"], group)
                        self._fill_group(project, zone, group["name"])
            return response

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _drop_disks_of(self, project, zone, instance_name):
        for disk in self.state.list("compute", project, f"disks/{zone}"):
            if any(u.endswith(f"/instances/{instance_name}") for u in disk.get("users", [])):
                if disk.get("_autoDelete"):
                    self.state.delete("compute", project, f"disks/{zone}", disk["name"])
                else:
                    disk["users"] = []
                    self.state.put("compute", project, f"disks/{zone}", disk["name"], disk)

    def _make_group_routes(self, app):
        import secrets

        from flask import jsonify, request
        from gcplocal.utils import error_response, timestamp_now

        state = self.state
        prefix = "/compute/v1/projects/<project>"

        def done(project, kind, zone=None, target=""):
            return jsonify(state.create_operation("compute", project, zone=zone, target_link=target, operation_type=kind))

        def insert_template(project):
            body = request.get_json(silent=True) or {}
            link = f"{self.url}/compute/v1/projects/{project}/global/instanceTemplates/{body['name']}"
            state.put("compute", project, "instanceTemplates", body["name"], {
                **body, "kind": "compute#instanceTemplate", "id": str(secrets.randbits(60)),
                "selfLink": link, "creationTimestamp": timestamp_now(),
            })
            return done(project, "insert", target=link)

        def get_template(project, name):
            template = state.get("compute", project, "instanceTemplates", name)
            return jsonify(template) if template else error_response(404, f"instance template {name} not found")

        def insert_group(project, zone):
            body = request.get_json(silent=True) or {}
            link = f"{self.url}/compute/v1/projects/{project}/zones/{zone}/instanceGroupManagers/{body['name']}"
            if "instanceTemplate" not in body and body.get("versions"):  # the API reports the one version's
                body["instanceTemplate"] = body["versions"][0]["instanceTemplate"]
            state.put("compute", project, f"instanceGroupManagers/{zone}", body["name"], {
                **body, "kind": "compute#instanceGroupManager", "id": str(secrets.randbits(60)),
                "zone": f"{self.url}/compute/v1/projects/{project}/zones/{zone}", "selfLink": link,
                "creationTimestamp": timestamp_now(), "targetSize": int(body.get("targetSize", 0)), "_members": [],
            })
            self._fill_group(project, zone, body["name"])
            return done(project, "insert", zone=zone, target=link)

        def get_group(project, zone, name):
            group = state.get("compute", project, f"instanceGroupManagers/{zone}", name)
            if not group:
                return error_response(404, f"instance group manager {name} not found in {zone}")
            return jsonify({k: v for k, v in group.items() if not k.startswith("_")})

        def list_groups(project, zone):
            items = state.list("compute", project, f"instanceGroupManagers/{zone}")
            return jsonify({"kind": "compute#instanceGroupManagerList", "items": [
                {k: v for k, v in g.items() if not k.startswith("_")} for g in items
            ]})

        def delete_group(project, zone, name):
            group = state.get("compute", project, f"instanceGroupManagers/{zone}", name)
            if not group:
                return error_response(404, f"instance group manager {name} not found in {zone}")
            for member in group["_members"]:
                state.delete("compute", project, f"instances/{zone}", member)
                self._drop_disks_of(project, zone, member)
            state.delete("compute", project, f"instanceGroupManagers/{zone}", name)
            return done(project, "delete", zone=zone)

        def aggregated_groups(project):
            items: dict[str, dict] = {}
            with state._lock:
                keys = [k for k in state._resources if k.startswith(f"compute/{project}/instanceGroupManagers/")]
            for key in keys:
                zone, name = key.split("/")[-2:]
                group = state.get("compute", project, f"instanceGroupManagers/{zone}", name)
                items.setdefault(f"zones/{zone}", {"instanceGroupManagers": []})["instanceGroupManagers"].append(
                    {k: v for k, v in group.items() if not k.startswith("_")}
                )
            return jsonify({"kind": "compute#instanceGroupManagerAggregatedList", "items": items})

        app.add_url_rule(f"{prefix}/global/instanceTemplates", "insert_template", insert_template, methods=["POST"])
        app.add_url_rule(f"{prefix}/global/instanceTemplates/<name>", "get_template", get_template, methods=["GET"])
        app.add_url_rule(f"{prefix}/zones/<zone>/instanceGroupManagers", "insert_group", insert_group, methods=["POST"])
        app.add_url_rule(f"{prefix}/zones/<zone>/instanceGroupManagers", "list_groups", list_groups, methods=["GET"])
        app.add_url_rule(f"{prefix}/zones/<zone>/instanceGroupManagers/<name>", "get_group", get_group, methods=["GET"])
        app.add_url_rule(
            f"{prefix}/zones/<zone>/instanceGroupManagers/<name>", "delete_group", delete_group, methods=["DELETE"]
        )
        app.add_url_rule(f"{prefix}/aggregated/instanceGroupManagers", "agg_groups", aggregated_groups)

    def _fill_group(self, project, zone, group_name):
        """Create VMs from the group's template until it has targetSize of them."""
        import secrets
        import string

        from gcplocal.utils import timestamp_now

        group = self.state.get("compute", project, f"instanceGroupManagers/{zone}", group_name)
        template_name = group["instanceTemplate"].rstrip("/").rsplit("/", 1)[-1]
        props = self.state.get("compute", project, "instanceTemplates", template_name)["properties"]
        while len(group["_members"]) < group["targetSize"]:
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
            name = f"{group['baseInstanceName']}-{suffix}"
            link = f"{self.url}/compute/v1/projects/{project}/zones/{zone}/instances/{name}"
            metadata = dict(props.get("metadata") or {})
            metadata["items"] = [*metadata.get("items", []), {
                "key": "created-by",
                "value": f"projects/{self.PROJECT_NUMBER}/zones/{zone}/instanceGroupManagers/{group_name}",
            }]
            self.state.put("compute", project, f"instances/{zone}", name, {
                **{k: v for k, v in props.items() if k not in ("disks", "metadata")},
                "kind": "compute#instance", "id": str(secrets.randbits(60)), "name": name, "status": "RUNNING",
                "zone": f"projects/{project}/zones/{zone}", "machineType": f"zones/{zone}/machineTypes/{props['machineType']}",
                "metadata": metadata, "selfLink": link, "creationTimestamp": timestamp_now(),
            })
            for disk in props.get("disks", []):
                params = disk.get("initializeParams") or {}
                if disk.get("boot"):
                    self.put_disk(project, zone, name, labels=params.get("labels", {}), users=[link],
                                  auto_delete=disk.get("autoDelete", False))
            group["_members"].append(name)
        self.state.put("compute", project, f"instanceGroupManagers/{zone}", group_name, group)

    def edit_group(self, project, zone, name, **fields):
        """Change what only time would change: creationTimestamp."""
        group = self.state.get("compute", project, f"instanceGroupManagers/{zone}", name)
        group.update(fields)
        self.state.put("compute", project, f"instanceGroupManagers/{zone}", name, group)

    def groups(self, project):
        return sorted(
            r["name"] for k, r in list(self.state._resources.items())
            if k.startswith(f"compute/{project}/instanceGroupManagers/")
        )

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
