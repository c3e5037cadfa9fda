"""The stack and component rules of ``StackService``, called directly on a real SQLite store.

Every refused change must raise a ConveyorError with a message a user can act on, and leave
the store exactly as it was.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from conveyor.contracts import (
    ComponentType,
    ConflictError,
    ConveyorError,
    NotFoundError,
    PipelineSpec,
    RunStatus,
    StepSpec,
    ValidationError,
    utcnow,
)
from conveyor.service.context import Services
from conveyor.service.stacks import DEFAULT, StackService
from conveyor.service.store import Writes
from conveyor.workers import flavors
from conveyor.workers.flavors import Flavor

ORCH, STORE = ComponentType.ORCHESTRATOR, ComponentType.ARTIFACT_STORE


class SecretConfig(BaseModel):
    """A flavor config with each kind of secret the masking must find."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr
    broker: str = Field(default="amqp://guest:guest@localhost:5672/", description="plain str URL")
    password: str | None = None
    retries: int = 3


@pytest.fixture
async def services(home: Path) -> AsyncIterator[Services]:
    opened = await Services.open(home)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def stacks(services: Services) -> StackService:
    return services.stacks


@pytest.fixture
def secret_flavor(monkeypatch: pytest.MonkeyPatch) -> str:
    flavor = Flavor(ORCH, "secretive", SecretConfig, "test flavor with secrets")
    monkeypatch.setitem(flavors.FLAVORS, (ORCH, "secretive"), flavor)
    return "secretive"


async def state(stacks: StackService) -> Any:
    """Everything the rules protect, to compare before and after a refused change."""
    return (
        [s.model_dump() for s in await stacks.list_stacks()],
        [c.model_dump() for c in await stacks.list_components()],
        await stacks.active_name(),
    )


async def two_stacks(stacks: StackService, tmp_path: Path) -> None:
    await stacks.register_component(STORE, "second", "local", {"path": str(tmp_path / "a2")})
    await stacks.register_component(ORCH, "fast", "local", {"concurrency": 2})
    await stacks.register_stack("two", {ORCH: "fast", STORE: "second"})
    await stacks.register_stack("three", {ORCH: "fast", STORE: DEFAULT})


# --- names are unique ---


async def test_register_component_of_an_existing_name_refuses(stacks: StackService) -> None:
    before = await state(stacks)
    with pytest.raises(ConflictError, match="orchestrator 'default' exists already"):
        await stacks.register_component(ORCH, DEFAULT, "local", {"concurrency": 9})
    assert await state(stacks) == before


async def test_same_name_for_two_component_types_is_allowed(
    stacks: StackService, tmp_path: Path
) -> None:
    await stacks.register_component(ORCH, "shared", "local")
    await stacks.register_component(STORE, "shared", "local", {"path": str(tmp_path)})
    assert (await stacks.get_component(STORE, "shared")).config == {"path": str(tmp_path)}


async def test_register_stack_of_an_existing_name_refuses(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    before = await state(stacks)
    with pytest.raises(ConflictError, match="stack 'two' exists already"):
        await stacks.register_stack("two", {ORCH: DEFAULT, STORE: DEFAULT}, activate=True)
    with pytest.raises(ConflictError, match="stack 'two' exists already"):
        await stacks.rename_stack("three", "two")
    with pytest.raises(ConflictError, match="stack 'two' exists already"):
        await stacks.copy_stack("three", "two")
    with pytest.raises(ConflictError, match="orchestrator 'default' exists already"):
        await stacks.rename_component(ORCH, "fast", DEFAULT)
    assert await state(stacks) == before


async def test_a_stack_needs_both_components(stacks: StackService) -> None:
    before = await state(stacks)
    with pytest.raises(ValidationError, match="missing: artifact store"):
        await stacks.register_stack("half", {ORCH: DEFAULT})
    assert await state(stacks) == before


async def test_names_outside_the_safe_alphabet_are_refused(stacks: StackService) -> None:
    with pytest.raises(ValidationError, match="invalid stack name 'a b'"):
        await stacks.register_stack("a b", {ORCH: DEFAULT, STORE: DEFAULT})
    with pytest.raises(ValidationError, match="invalid orchestrator name"):
        await stacks.register_component(ORCH, "../x", "local")


# --- a component in use is kept ---


async def test_component_used_by_stacks_cannot_be_deleted_and_the_message_names_them(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    before = await state(stacks)
    with pytest.raises(ConflictError) as refused:
        await stacks.delete_component(ORCH, "fast")
    assert "orchestrator 'fast' is used by stacks 'two', 'three'" in str(refused.value)
    assert await state(stacks) == before
    await stacks.update_stack("two", {ORCH: DEFAULT})
    await stacks.delete_stack("three")
    await stacks.delete_component(ORCH, "fast")
    assert [c.name for c in await stacks.list_components(ORCH)] == [DEFAULT]


# --- the active and the default stack are kept ---


async def test_the_active_stack_cannot_be_deleted(stacks: StackService, tmp_path: Path) -> None:
    await two_stacks(stacks, tmp_path)
    await stacks.activate("two")
    before = await state(stacks)
    with pytest.raises(ConflictError, match="'two' is the active stack; activate another"):
        await stacks.delete_stack("two")
    assert await state(stacks) == before


async def test_the_stack_active_through_the_environment_cannot_be_deleted(
    stacks: StackService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await two_stacks(stacks, tmp_path)
    monkeypatch.setenv("CONVEYOR_STACK", "three")
    with pytest.raises(ConflictError, match=r"active stack \(through \$CONVEYOR_STACK\)"):
        await stacks.delete_stack("three")
    assert (await stacks.resolve()).name == "three"


async def test_the_default_stack_cannot_be_deleted_or_renamed(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    await stacks.activate("two")
    before = await state(stacks)
    with pytest.raises(ConflictError, match="the default stack cannot be deleted"):
        await stacks.delete_stack(DEFAULT)
    with pytest.raises(ConflictError, match="the default stack cannot be renamed"):
        await stacks.rename_stack(DEFAULT, "old")
    assert await state(stacks) == before


# --- flavor configs are validated ---


async def test_unknown_config_key_lists_the_valid_keys(stacks: StackService) -> None:
    before = await state(stacks)
    with pytest.raises(ValidationError) as refused:
        await stacks.register_component(ORCH, "x", "local", {"concurency": 2})
    assert "unknown key 'concurency' (valid keys: concurrency, max_active_runs)" in str(
        refused.value
    )
    with pytest.raises(ValidationError, match=r"unknown key 'root' \(valid keys: path\)"):
        await stacks.update_component(STORE, DEFAULT, {"root": "/tmp"})
    assert await state(stacks) == before


async def test_wrong_type_names_the_key_and_the_expected_type(stacks: StackService) -> None:
    await stacks.register_component(ORCH, "fast", "local", {"concurrency": 2})
    before = await state(stacks)
    with pytest.raises(ValidationError) as refused:
        await stacks.update_component(ORCH, "fast", {"concurrency": "lots"})
    message = str(refused.value)
    assert "key 'concurrency' expects int" in message and "(got 'lots')" in message
    with pytest.raises(ValidationError, match="key 'concurrency' expects int"):
        await stacks.register_component(ORCH, "slow", "local", {"concurrency": [1]})
    with pytest.raises(ValidationError, match="missing key 'path'"):
        await stacks.register_component(STORE, "nowhere", "local", {})
    assert await state(stacks) == before


async def test_unknown_flavor_lists_the_flavors(stacks: StackService) -> None:
    with pytest.raises(ValidationError, match=r"unknown artifact_store flavor 's4' \(available: "):
        await stacks.register_component(STORE, "x", "s4", {})


async def test_config_is_stored_typed_and_update_merges_and_resets(stacks: StackService) -> None:
    created = await stacks.register_component(ORCH, "fast", "local", {"concurrency": "8"})
    assert created.config == {"concurrency": 8}
    updated = await stacks.update_component(ORCH, "fast", {"concurrency": None})
    assert updated.config == {}
    assert flavors.masked_config(updated) == {"concurrency": 4, "max_active_runs": 8}


# --- unknown names suggest ---


async def test_unknown_names_suggest_the_closest(stacks: StackService, tmp_path: Path) -> None:
    await two_stacks(stacks, tmp_path)
    with pytest.raises(NotFoundError, match=r"no stack named 'thre' \(did you mean: three\?\)"):
        await stacks.activate("thre")
    with pytest.raises(NotFoundError, match=r"no orchestrator named 'fats' \(did you mean: fast"):
        await stacks.register_stack("four", {ORCH: "fats", STORE: DEFAULT})
    with pytest.raises(NotFoundError, match=r"no artifact store named 'secnod' \(did you mean"):
        await stacks.delete_component(STORE, "secnod")
    with pytest.raises(NotFoundError, match=r"no stack named 'zzz'$"):
        await stacks.get("zzz")
    assert [s.name for s in await stacks.list_stacks()] == [DEFAULT, "two", "three"]


# --- active stack, renames, copies ---


async def test_activate_rename_keeps_the_active_stack(stacks: StackService, tmp_path: Path) -> None:
    await two_stacks(stacks, tmp_path)
    await stacks.activate("two")
    renamed = await stacks.rename_stack("two", "team")
    assert await stacks.active_name() == "team"
    assert (await stacks.resolve()).id == renamed.id
    await stacks.rename_component(STORE, "second", "nfs")
    assert (await stacks.get("team")).component(STORE).name == "nfs"


async def test_copy_has_the_same_components_and_a_new_id(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    source = await stacks.get("two")
    copy = await stacks.copy_stack("two", "two-copy")
    assert copy.id != source.id
    assert {t: c.id for t, c in copy.components.items()} == {
        t: c.id for t, c in source.components.items()
    }


async def test_register_with_activate_sets_the_active_stack(stacks: StackService) -> None:
    await stacks.register_stack("other", {ORCH: DEFAULT, STORE: DEFAULT}, activate=True)
    assert await stacks.active_name() == "other"


# --- export and import ---


async def test_export_then_import_into_a_fresh_home_reproduces_the_stack(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    data = await stacks.export_stack("two")
    async with await Services.open(tmp_path / "fresh") as fresh:
        imported = await fresh.stacks.import_stack(data)
        again = await fresh.stacks.import_stack(data, name="two-again")
    original = await stacks.get("two")
    assert imported.name == "two"
    for type_, component in original.components.items():
        copy = imported.components[type_]
        assert (copy.name, copy.flavor, copy.config) == (
            component.name,
            component.flavor,
            component.config,
        )
        assert again.components[type_].id == copy.id  # reused, not created twice


async def test_import_does_not_overwrite_a_different_component_of_the_same_name(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    data = await stacks.export_stack("two")
    data["components"]["artifact_store"]["configuration"]["path"] = str(tmp_path / "elsewhere")
    imported = await stacks.import_stack(data, name="moved")
    assert imported.component(STORE).name == "second-2"
    assert imported.component(ORCH).name == "fast"
    second = await stacks.get_component(STORE, "second")
    assert second.config == {"path": str(tmp_path / "a2")}


async def test_import_refuses_an_existing_stack_name_and_a_bad_file(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    data = await stacks.export_stack("two")
    before = await state(stacks)
    with pytest.raises(ConflictError, match="stack 'two' exists already"):
        await stacks.import_stack(data)
    with pytest.raises(ValidationError, match="not a Conveyor stack export"):
        await stacks.import_stack({"stack": "two"})
    data["components"]["orchestrator"]["configuration"] = {"concurrency": "many"}
    data["components"]["orchestrator"]["name"] = "new"
    with pytest.raises(ValidationError, match="key 'concurrency' expects int"):
        await stacks.import_stack(data, name="four")
    assert await state(stacks) == before


# --- secrets ---


async def test_secrets_are_masked_everywhere_they_are_shown(
    stacks: StackService, secret_flavor: str
) -> None:
    config = {"token": "tok-123", "broker": "amqp://bob:pw-456@mq:5672/v", "password": "pw-789"}
    component = await stacks.register_component(ORCH, "s", secret_flavor, config)
    assert component.config["token"] == "tok-123"  # stored in clear, to be usable
    shown = flavors.masked_config(component)
    assert shown == {
        "token": "**********",
        "broker": "amqp://bob:****@mq:5672/v",
        "password": "**********",
        "retries": 3,
    }
    await stacks.register_stack("secret", {ORCH: "s", STORE: DEFAULT})
    exported = await stacks.export_stack("secret")
    assert exported["secrets"] == "masked"
    text = repr(exported)
    assert "tok-123" not in text and "pw-456" not in text and "pw-789" not in text
    keys = {k.key: k for k in flavors.get_flavor(ORCH, secret_flavor).config_keys()}
    assert keys["token"].secret and keys["token"].required
    assert keys["broker"].default == "amqp://guest:****@localhost:5672/"


async def test_a_masked_export_cannot_create_a_component_but_reuses_an_existing_one(
    stacks: StackService, secret_flavor: str, tmp_path: Path
) -> None:
    await stacks.register_component(ORCH, "s", secret_flavor, {"token": "tok-123"})
    await stacks.register_stack("secret", {ORCH: "s", STORE: DEFAULT})
    masked = await stacks.export_stack("secret")
    assert (await stacks.import_stack(masked, name="same")).component(ORCH).name == "s"
    async with await Services.open(tmp_path / "fresh") as fresh:
        with pytest.raises(ValidationError, match=r"'s' was exported with its secrets masked"):
            await fresh.stacks.import_stack(masked)
        assert [s.name for s in await fresh.stacks.list_stacks()] == [DEFAULT]
        clear = await stacks.export_stack("secret", include_secrets=True)
        imported = await fresh.stacks.import_stack(clear)
        assert imported.component(ORCH).config["token"] == "tok-123"


async def test_a_wrong_type_on_a_secret_does_not_echo_it(
    stacks: StackService, secret_flavor: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        await stacks.register_component(ORCH, "s", secret_flavor, {"token": 123456789})
    assert "123456789" not in str(refused.value)
    assert "key 'token' expects SecretStr" in str(refused.value)


async def test_import_compares_configs_by_value_not_by_spelling(
    stacks: StackService, tmp_path: Path
) -> None:
    await two_stacks(stacks, tmp_path)
    data = await stacks.export_stack("two")
    data["components"]["orchestrator"]["configuration"] = {"concurrency": "2"}
    imported = await stacks.import_stack(data, name="same")
    assert imported.component(ORCH).id == (await stacks.get_component(ORCH, "fast")).id
    assert len(await stacks.list_components()) == 4


async def test_a_service_stack_with_queued_runs_cannot_be_renamed_or_deleted(
    services: Services, stacks: StackService, tmp_path: Path, rabbitmq: str
) -> None:
    # The broker is asked whether anything consumes the stack's queues: nothing does here.
    prefix = f"t{uuid.uuid4().hex[:12]}"
    await stacks.register_component(ORCH, "rmq", "rabbitmq", {"url": rabbitmq, "prefix": prefix})
    await stacks.register_stack("prod", {ORCH: "rmq", STORE: DEFAULT})
    stack = await stacks.get("prod")
    spec = PipelineSpec(name="p", steps=[StepSpec(name="a", ref="m:a")])
    writes = Writes()
    services.runs.insert_run(
        writes,
        run_id="r1",
        spec=spec,
        stack_id=stack.id,
        stack_name="prod",
        stack_snapshot={},
        idempotency_key=None,
        owner=None,
        now=utcnow(),
    )
    await services.db.write(writes)
    before = await state(stacks)
    with pytest.raises(ConflictError, match="1 unfinished run"):
        await stacks.rename_stack("prod", "production")
    # Nor deleted: the CLI asks deletable() before it asks the user to confirm.
    for refused in (stacks.deletable, stacks.delete_stack):
        with pytest.raises(ConflictError, match=r"1 unfinished run.*delete it once they finish"):
            await refused("prod")
    assert await state(stacks) == before
    await services.owned_runs.end_unfinished(["r1"], RunStatus.FAILED, "test over")
    assert (await stacks.rename_stack("prod", "production")).name == "production"
    assert (await stacks.deletable("production")).name == "production"
    await stacks.delete_stack("production")


async def test_a_huge_name_is_not_echoed_back_whole(stacks: StackService) -> None:
    huge = "%_x" * 5000
    for attempt in (
        lambda: stacks.get(huge),
        lambda: stacks.get_component(ORCH, huge),
        lambda: stacks.register_component(ORCH, huge, "local"),
    ):
        with pytest.raises(ConveyorError) as caught:
            await attempt()
        assert len(str(caught.value)) < 400, str(caught.value)[:200]
        assert "%_x%_x" in str(caught.value), "it still says what was given"
