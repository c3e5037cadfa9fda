"""``deploy/``: the compose file and Kubernetes manifests parse and run commands that exist.

Artifacts live in an S3 bucket (MinIO under compose), so no volume is shared for them, and the
workers' KEDA autoscaler watches the step queue that the stack's topology really declares.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from conveyor.contracts import DEFAULT_POOL, ComponentType, StackSpec, Topology, ValidationError
from conveyor.service.cli.app import app
from conveyor.service.processes import read_stack_file, stack_from_export
from conveyor.workers.flavors import get_flavor, orchestrator_config
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.secrets import secret_keys
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
# Typer bundles its own click; its usage errors are the bases of typer.BadParameter.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The s3 flavor's secret keys: the stack file must leave them to the environment.
S3_SECRET_KEYS = {"access_key_id", "secret_access_key", "session_token"}
# Where the image keeps the metadata store (ENV CONVEYOR_HOME in deploy/Dockerfile).
STATE_DIR = "/var/lib/conveyor"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def check_command(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` with the real CLI: the command exists and takes these options.

    Returns the parsed parameters of the command.
    """
    assert argv[0] == "conveyor", argv
    command: Any = typer.main.get_command(app)
    args = list(argv[1:])
    while hasattr(command, "list_commands"):
        name, *args = args
        found = command.get_command(typer.Context(command), name)
        assert found is not None, f"no command {name!r} in {argv}"
        command = found
    return dict(command.make_context(" ".join(argv[:3]), args).params)


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of ``deploy/k8s``, its subfolders (such as ``keda/``) included."""
    found = {}
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in load_all(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deploy_stack() -> StackSpec:
    """The stack of ``deploy/stack.yaml``, every component validated by its flavor."""
    return stack_from_export(read_stack_file(DEPLOY / "stack.yaml", "amqp://u:p@rabbitmq/"))


def secret_data(secret: dict[str, Any]) -> dict[str, Any]:
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def test_check_command_catches_what_does_not_exist() -> None:
    check_command(["conveyor", "worker", "start", "--concurrency", "4"])
    with pytest.raises(AssertionError, match="no command"):
        check_command(["conveyor", "workers", "start"])
    with pytest.raises(UsageError):
        check_command(["conveyor", "worker", "start", "--no-such-option"])
    with pytest.raises(typer.BadParameter):
        check_command(["conveyor", "worker", "start", "--concurrency", "many"])


def test_compose_runs_rabbitmq_minio_a_controller_and_workers_sharing_no_volume() -> None:
    [compose] = load_all(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"rabbitmq", "minio", "controller", "worker"} <= set(services)
    worker, controller = services["worker"], services["controller"]
    # --scale worker=N needs a service without a fixed name or host port.
    assert "container_name" not in worker and "ports" not in worker
    conveyors = {n: s for n, s in services.items() if s.get("image", "").startswith("conveyor")}
    assert {"controller", "worker"} <= set(conveyors)
    for service in conveyors.values():
        if "command" in service:
            check_command([*service.get("entrypoint", []), *service["command"]])
    assert controller["command"][:3] == ["conveyor", "controller", "start"]
    assert worker["command"][:3] == ["conveyor", "worker", "start"]
    stack = deploy_stack()
    config = orchestrator_config(stack)
    assert isinstance(config, RabbitMQOrchestratorConfig)
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > config.grace_s
    if "client" in conveyors:
        client = check_command(["conveyor", *conveyors["client"]["command"]])
        assert client["stack"] == stack.name

    # MinIO, healthy before the bucket of the stack is made, and that before conveyor starts.
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert minio["healthcheck"]["test"]
    store = stack.component(ComponentType.ARTIFACT_STORE).config
    endpoint = urlsplit(store["endpoint_url"])
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    [(init_name, init)] = [(n, s) for n, s in services.items() if s["image"].startswith("minio/mc")]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mb" in init["command"] and init["command"][-1].endswith(f"/{store['bucket']}")
    assert init.get("restart", "no") == "no"
    for name, service in conveyors.items():
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert service["depends_on"][init_name]["condition"] == (
            "service_completed_successfully"
        ), name
        # The object store's credentials: the standard variables, MinIO's own pair.
        env = service["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"], name
        assert "CONVEYOR_AMQP_URL" in env, name

    # No volume shared for artifacts: a worker mounts only the stack file, and the only
    # named volume two services share is the metadata store of the controller (and client).
    def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
        return [(v.split(":")[0], v.split(":")[1]) for v in service.get("volumes", [])]

    def named(source: str) -> bool:
        return not source.startswith((".", "/", "~"))

    assert mounts(worker) == [("./stack.yaml", "/etc/conveyor/stack.yaml")]
    users: dict[str, set[str]] = {}
    for name, service in services.items():
        for source, target in mounts(service):
            if named(source):
                users.setdefault(source, set()).add(name)
                if name in conveyors:
                    assert target == STATE_DIR, (name, source, target)
    assert "artifacts" not in compose["volumes"]
    assert users["minio"] == {"minio"}
    shared = {volume for volume, names in users.items() if len(names) > 1}
    assert shared <= {"state"}


def test_the_image_holds_conveyor_and_no_pipelines() -> None:
    """Workers download a run's code from the store: the image copies only the package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    allowed = package_dirs | {"pyproject.toml", project["project"]["readme"]}
    copied = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied |= {w.rstrip("/").removeprefix("./") for w in words[1:-1]}
    assert copied and copied <= allowed, copied - allowed
    assert "examples" not in copied and "." not in copied


def test_kubernetes_manifests_one_controller_scalable_workers_and_the_stack_configmap() -> None:
    objects = k8s_objects()
    controller = objects[("Deployment", "conveyor-controller")]
    worker = objects[("Deployment", "conveyor-worker")]
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    assert worker["spec"]["replicas"] >= 1
    configmap = objects[("ConfigMap", "conveyor-stack")]
    assert configmap["data"]["stack.yaml"] == (DEPLOY / "stack.yaml").read_text()
    claims = {name: obj for (kind, name), obj in objects.items() if kind == "PersistentVolumeClaim"}
    secrets = {name: obj for (kind, name), obj in objects.items() if kind == "Secret"}
    claimed_by: dict[str, list[str]] = {}
    for deployment in (controller, worker):
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        check_command(container["command"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["stack"]["configMap"]["name"] == "conveyor-stack"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims
                claimed_by.setdefault(claim, []).append(deployment["metadata"]["name"])
        env = {e["name"]: e for e in container["env"]}
        for entry in env.values():
            if "valueFrom" in entry:
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] in secrets
                assert ref["key"] in secret_data(secrets[ref["name"]]), ref
        # The object store's credentials come from a Secret, never from a plain value.
        for name in CREDENTIAL_ENV:
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        stack_file = Path(container["command"][container["command"].index("--stack-file") + 1])
        assert mounted["stack"] == str(stack_file.parent) and stack_file.name == "stack.yaml"
    stack = deploy_stack()
    config = orchestrator_config(stack)
    assert isinstance(config, RabbitMQOrchestratorConfig)
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_s
    # No volume shared for artifacts: workers mount no claim, no claim is shared or
    # ReadWriteMany, and the old artifact claim is gone.
    assert "conveyor-artifacts" not in claims
    assert "conveyor-worker" not in {d for users in claimed_by.values() for d in users}
    assert all(len(users) == 1 for users in claimed_by.values()), claimed_by
    for name, claim in claims.items():
        assert "ReadWriteMany" not in claim["spec"]["accessModes"], name
    # `kubectl apply -f deploy/k8s/` needs no CRD: KEDA's objects live in a subfolder.
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in load_all(path):
            assert doc["apiVersion"] in {"v1", "apps/v1"}, (path.name, doc["kind"])


def test_the_stack_stores_artifacts_in_s3_with_credentials_only_from_the_environment() -> None:
    stack = deploy_stack()
    store = stack.component(ComponentType.ARTIFACT_STORE)
    assert store.flavor == "s3"
    flavor = get_flavor(ComponentType.ARTIFACT_STORE, "s3")
    validated = flavor.validate(store.config)
    assert validated.model_dump()["bucket"] == store.config["bucket"]
    hidden = S3_SECRET_KEYS | secret_keys(flavor.config_model)
    assert not hidden & set(store.config), hidden & set(store.config)
    # No credential of the deployments appears in the stack file or the configmap.
    texts = [(DEPLOY / "stack.yaml").read_text()]
    texts += [doc.get("data", {}).get("stack.yaml", "") for doc in k8s_objects().values()]
    credentials = {
        str(value)
        for (kind, _), doc in k8s_objects().items()
        if kind == "Secret"
        for value in secret_data(doc).values()
    }
    [compose] = load_all(DEPLOY / "compose.yaml")
    for service in compose["services"].values():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key or "SECRET" in key or key == "CONVEYOR_AMQP_URL":
                # "${VAR:-default}": the default is the credential.
                credentials |= set(re.findall(r":-([^}]+)}", str(value))) or {str(value)}
    assert credentials
    for text in texts:
        for credential in credentials:
            assert credential not in text, credential


def test_keda_scales_the_workers_on_the_step_queue_of_their_pool() -> None:
    objects = k8s_objects()
    worker = objects[("Deployment", "conveyor-worker")]
    [scaled] = [obj for (kind, _), obj in objects.items() if kind == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == worker["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert 1 <= low <= worker["spec"]["replicas"] <= high

    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    assert metadata["mode"] == "QueueLength" and float(metadata["value"]) > 0
    assert metadata.get("protocol", "amqp") == "amqp"
    # The queue is the real step queue of the pool the workers serve, on the file's stack.
    [container] = worker["spec"]["template"]["spec"]["containers"]
    pools = check_command(container["command"])["pool"] or [DEFAULT_POOL]
    assert pools == [DEFAULT_POOL]
    stack = deploy_stack()
    config = orchestrator_config(stack)
    assert isinstance(config, RabbitMQOrchestratorConfig)
    topology = Topology(stack=stack.name, prefix=config.prefix)
    assert metadata["queueName"] == topology.step_queue(DEFAULT_POOL)
    assert stack.name == yaml.safe_load((DEPLOY / "stack.yaml").read_text())["stack_name"]

    # KEDA reads the broker URL from the Secret the workers get it from.
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    [ref] = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    env = {e["name"]: e for e in container["env"]}
    url_ref = env["CONVEYOR_AMQP_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (url_ref["name"], url_ref["key"])
    secret = objects[("Secret", ref["name"])]
    assert urlsplit(secret_data(secret)[ref["key"]]).scheme in {"amqp", "amqps"}


def test_a_stack_file_with_a_masked_password_needs_the_url() -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_AMQP_URL"):
        read_stack_file(DEPLOY / "stack.yaml")
    stack = stack_from_export(read_stack_file(DEPLOY / "stack.yaml", "amqp://u:secret@h/vh"))
    assert stack.name == "prod"
    url = stack.component(ComponentType.ORCHESTRATOR).config["url"]
    assert url == "amqp://u:secret@h/vh"
