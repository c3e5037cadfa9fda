"""``deploy/``: the compose file and Kubernetes manifests parse and run commands that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from conveyor.contracts import ComponentType, ValidationError
from conveyor.service.cli.app import app
from conveyor.service.processes import read_stack_file, stack_from_export
from conveyor.workers.flavors import orchestrator_config
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
# Typer bundles its own click; its usage errors are the bases of typer.BadParameter.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def check_command(argv: list[str]) -> None:
    """Parse ``argv`` with the real CLI: the command exists and takes these options."""
    assert argv[0] == "conveyor", argv
    command: Any = typer.main.get_command(app)
    args = list(argv[1:])
    while hasattr(command, "list_commands"):
        name, *args = args
        found = command.get_command(typer.Context(command), name)
        assert found is not None, f"no command {name!r} in {argv}"
        command = found
    command.make_context(" ".join(argv[:3]), args)


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_all(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_check_command_catches_what_does_not_exist() -> None:
    check_command(["conveyor", "worker", "start", "--concurrency", "4"])
    with pytest.raises(AssertionError, match="no command"):
        check_command(["conveyor", "workers", "start"])
    with pytest.raises(UsageError):
        check_command(["conveyor", "worker", "start", "--no-such-option"])
    with pytest.raises(typer.BadParameter):
        check_command(["conveyor", "worker", "start", "--concurrency", "many"])


def test_compose_runs_rabbitmq_a_controller_and_scalable_workers_on_shared_artifacts() -> None:
    [compose] = load_all(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"rabbitmq", "controller", "worker"} <= set(services)
    worker, controller = services["worker"], services["controller"]
    # --scale worker=N needs a service without a fixed name or host port.
    assert "container_name" not in worker and "ports" not in worker
    for service in services.values():
        if "command" in service and service.get("image", "").startswith("conveyor"):
            check_command([*service.get("entrypoint", []), *service["command"]])
    assert controller["command"][:3] == ["conveyor", "controller", "start"]
    assert worker["command"][:3] == ["conveyor", "worker", "start"]

    def mounts(service: dict[str, Any]) -> set[str]:
        return {v.split(":")[0] for v in service["volumes"]}

    assert "artifacts" in mounts(worker) & mounts(controller)
    assert "artifacts" in compose["volumes"]
    stack = stack_from_export(read_stack_file(DEPLOY / "stack.yaml", "amqp://u:p@rabbitmq/"))
    config = orchestrator_config(stack)
    assert isinstance(config, RabbitMQOrchestratorConfig)
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > config.grace_s


def test_kubernetes_manifests_one_controller_scalable_workers_and_the_stack_configmap() -> None:
    objects = k8s_objects()
    controller = objects[("Deployment", "conveyor-controller")]
    worker = objects[("Deployment", "conveyor-worker")]
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    assert worker["spec"]["replicas"] >= 1
    configmap = objects[("ConfigMap", "conveyor-stack")]
    assert configmap["data"]["stack.yaml"] == (DEPLOY / "stack.yaml").read_text()
    claims = {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    secrets = {name for kind, name in objects if kind == "Secret"}
    for deployment in (controller, worker):
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        check_command(container["command"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["stack"]["configMap"]["name"] == "conveyor-stack"
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] in claims
        for env in container["env"]:
            if "valueFrom" in env:
                assert env["valueFrom"]["secretKeyRef"]["name"] in secrets
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        stack_file = Path(container["command"][container["command"].index("--stack-file") + 1])
        assert mounted["stack"] == str(stack_file.parent) and stack_file.name == "stack.yaml"
    stack = stack_from_export(read_stack_file(DEPLOY / "stack.yaml", "amqp://u:p@rabbitmq/"))
    config = orchestrator_config(stack)
    assert isinstance(config, RabbitMQOrchestratorConfig)
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_s
    store = stack.component(ComponentType.ARTIFACT_STORE).config["path"]
    [worker_container] = worker["spec"]["template"]["spec"]["containers"]
    assert {m["mountPath"] for m in worker_container["volumeMounts"]} >= {store}


def test_a_stack_file_with_a_masked_password_needs_the_url() -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_AMQP_URL"):
        read_stack_file(DEPLOY / "stack.yaml")
    stack = stack_from_export(read_stack_file(DEPLOY / "stack.yaml", "amqp://u:secret@h/vh"))
    assert stack.name == "prod"
    url = stack.component(ComponentType.ORCHESTRATOR).config["url"]
    assert url == "amqp://u:secret@h/vh"
