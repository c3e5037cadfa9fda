"""Stack rules: the default and active stacks, lookups with suggestions, and every change.

The component rules live in ``service.components`` (``ComponentRules``, a base of
``StackService``). Every write checks its rules and changes the store inside one transaction,
so a refused change leaves everything as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiosqlite

from conveyor.contracts import (
    ComponentSpec,
    ComponentType,
    ConflictError,
    NotFoundError,
    StackSpec,
    ValidationError,
    new_id,
    utcnow,
)
from conveyor.contracts.enums import label
from conveyor.contracts.errors import shown
from conveyor.service.components import ComponentRules, check_name, suggest
from conveyor.service.home import STACK_ENV, Home
from conveyor.service.store import Database, StackStore
from conveyor.service.users import LOCAL_ADMIN, LOCAL_USER, Actor
from conveyor.workers.flavors import exported_config, get_flavor
from conveyor.workers.secrets import masked_paths

# The queue moves (the stack probes, a broker's client) and the export format are imported
# by the changes that use them: listing stacks and runs (the CLI's most frequent commands,
# every Client) needs neither.
if TYPE_CHECKING:
    from conveyor.service.queue_moves import QueueCheck
    from conveyor.service.stack_files import ExportedComponent

DEFAULT = "default"
ACTIVE_STACK_KEY = "active_stack"
# Every stack runs pipelines, so it needs both; later component types may be optional.
REQUIRED_TYPES = (ComponentType.ORCHESTRATOR, ComponentType.ARTIFACT_STORE)

__all__ = ["ACTIVE_STACK_KEY", "DEFAULT", "REQUIRED_TYPES", "StackService", "suggest"]


def _check_unchanged(checked: StackSpec, current: StackSpec) -> None:
    """Refuse when another process changed the stack's orchestrator (or replaced the stack)
    while its queues were checked outside the write transaction."""
    orchestrator = ComponentType.ORCHESTRATOR
    if (current.id, current.component(orchestrator)) != (
        checked.id,
        checked.component(orchestrator),
    ):
        raise ConflictError(
            f"stack {current.name!r} changed while its queues were checked; try again"
        )


def active_stack_key(user: str) -> str:
    """The setting that holds ``user``'s active stack (the local user's is the plain key, as
    it was before users)."""
    return ACTIVE_STACK_KEY if user == LOCAL_USER else f"{ACTIVE_STACK_KEY}:{user}"


class StackService(ComponentRules):
    """Stacks and their components: reads, the active stack, and every change under the rules.

    Every call acts for ``actor`` (the local admin on a client's own home; on a server, the
    user of the request, through ``for_user``): a private stack or component is seen and
    used by its owner and the admins only, and only they change or delete it.
    """

    def __init__(self, db: Database, home: Home, actor: Actor = LOCAL_ADMIN) -> None:
        self.db = db
        self.home = home
        self.store = StackStore(db)
        self.actor = actor

    def for_user(self, actor: Actor) -> StackService:
        """The same stacks, seen and changed by ``actor``."""
        return StackService(self.db, self.home, actor)

    async def ensure_default(self) -> None:
        """Create the default stack (local orchestrator, local store) on first use."""
        if await self.store.stack(DEFAULT) is not None:
            return
        now = utcnow()
        orchestrator = await self.store.component(ComponentType.ORCHESTRATOR, DEFAULT)
        store = await self.store.component(ComponentType.ARTIFACT_STORE, DEFAULT)
        orchestrator = orchestrator or ComponentSpec(
            id=new_id(),
            type=ComponentType.ORCHESTRATOR,
            name=DEFAULT,
            flavor="local",
            config={},
            created=now,
        )
        store = store or ComponentSpec(
            id=new_id(),
            type=ComponentType.ARTIFACT_STORE,
            name=DEFAULT,
            flavor="local",
            config={"path": str(self.home.default_artifacts)},
            created=now,
        )
        async with self.db.transaction() as conn:
            # Another process may have created it since we looked.
            async with conn.execute("SELECT 1 FROM stacks WHERE name = ?", (DEFAULT,)) as cur:
                if await cur.fetchone() is not None:
                    return
            await self.store.save_component(conn, orchestrator)
            await self.store.save_component(conn, store)
            await self.store.save_stack(
                conn,
                StackSpec(
                    id=new_id(),
                    name=DEFAULT,
                    components={orchestrator.type: orchestrator, store.type: store},
                    created=now,
                ),
            )

    async def list_stacks(self) -> list[StackSpec]:
        """Every stack this actor may see, oldest first."""
        return [s for s in await self.store.stacks() if self.actor.may_see(s.owner, s.shared)]

    async def get(self, name: str) -> StackSpec:
        """The stack called ``name`` (or with that id) if this actor may see it; the error
        suggests the closest names (of visible stacks: another user's private stack is not
        there for them)."""
        stacks = await self.list_stacks()
        for stack in stacks:
            if stack.name == name:
                return stack
        for stack in stacks:
            if stack.id == name:
                return stack
        raise NotFoundError(
            f"no stack named {shown(name)}{suggest(name, (s.name for s in stacks))}"
        )

    async def active_name(self) -> str:
        """$CONVEYOR_STACK, else the client's chosen stack, else the default stack."""
        chosen = await self.store.setting(active_stack_key(self.actor.name))
        return os.environ.get(STACK_ENV) or chosen or DEFAULT

    async def resolve(self, name: str | None = None) -> StackSpec:
        """The stack a command works on: ``name`` if given, else the active stack."""
        return await self.get(name or await self.active_name())

    # --- changes ---

    async def _components(
        self, components: Mapping[ComponentType, str]
    ) -> dict[ComponentType, ComponentSpec]:
        return {t: await self.get_component(t, name) for t, name in components.items()}

    async def _check_free(self, name: str) -> None:
        check_name("stack", name)
        if await self.store.stack(name) is not None:
            raise ConflictError(f"stack {name!r} exists already; choose another name")

    async def register_stack(
        self,
        name: str,
        components: Mapping[ComponentType, str],
        activate: bool = False,
        shared: bool = False,
    ) -> StackSpec:
        """Create a stack of existing components (by name) owned by this actor, and make it
        active if asked. A ``shared`` stack is usable by every user, and so are its
        components, which this actor must then be allowed to share."""
        missing = [label(t) for t in REQUIRED_TYPES if not components.get(t)]
        if missing:
            raise ValidationError(
                f"stack {name!r} needs an orchestrator and an artifact store; missing: "
                + ", ".join(missing)
            )
        async with self.db.transaction() as conn:
            await self._check_free(name)
            stack = StackSpec(
                id=new_id(),
                name=name,
                components=await self._components(components),
                owner=self.actor.name,
                created=utcnow(),
            )
            if shared:
                stack = await self._shared(conn, stack, True)
            await self.store.save_stack(conn, stack)
            if activate:
                await self.store.set_setting(conn, self._active_key, stack.name)
        return stack

    async def update_stack(self, name: str, components: Mapping[ComponentType, str]) -> StackSpec:
        """Replace some components of a stack; later runs use them, past runs keep theirs.
        A new orchestrator whose queues are elsewhere waits until nothing consumes the old."""
        from conveyor.service.queue_moves import after_move, check_queues_kept

        chosen = {t: c for t, c in components.items() if c}
        if not chosen:
            raise ValidationError(f"nothing to update on stack {name!r}: give a component")
        stack = await self._changeable(name)
        replaced = await self._components(chosen)
        pools = await self._pools(stack)
        # Outside the write transaction: a slow broker must not lock the store.
        moves = await check_queues_kept(
            stack, stack.model_copy(update={"components": {**stack.components, **replaced}}), pools
        )
        async with self.db.transaction() as conn:
            current = await self._changeable(name)
            _check_unchanged(stack, current)
            if await self._components(chosen) != replaced:
                raise ConflictError(
                    f"the components for stack {current.name!r} changed while its queues "
                    "were checked; try again"
                )
            updated = current.model_copy(update={"components": {**current.components, **replaced}})
            await self.store.save_stack(conn, updated)
        if moves is not None:
            await after_move(stack, pools, "moved to other queues", moves)
        return updated

    async def rename_stack(self, name: str, new_name: str) -> StackSpec:
        """Rename a stack; it stays active if it was, and its runs stay its runs (by id).
        A service stack is renamed only while nothing consumes its queues."""
        from conveyor.service.queue_moves import after_move, check_no_consumers

        stack = await self._renamable(name, new_name)
        if new_name == stack.name:
            return stack
        pools = await self._pools(stack)
        # Outside the write transaction: a slow broker must not lock the store.
        await check_no_consumers(
            stack,
            "renamed",
            f"stop them, rename it, then start them with --stack {new_name}",
            pools=pools,
        )
        async with self.db.transaction() as conn:
            current = await self._renamable(name, new_name)
            _check_unchanged(stack, current)
            renamed = current.model_copy(update={"name": new_name})
            await self.store.save_stack(conn, renamed)
            # Every user whose active stack it was keeps it active.
            await self.store.rename_setting_values(
                conn, ACTIVE_STACK_KEY, f"{ACTIVE_STACK_KEY}:", stack.name, new_name
            )
        await after_move(stack, pools, "renamed")
        return renamed

    async def _renamable(self, name: str, new_name: str) -> StackSpec:
        """The stack ``name`` if the rules in the store let it be called ``new_name``."""
        stack = await self._changeable(name, unless_default="renamed; copy it instead")
        if new_name != stack.name:
            await self._check_free(new_name)
            await self._check_no_queued_work(
                stack, "rename it once they finish, then restart its controller and workers"
            )
        return stack

    async def _check_no_queued_work(self, stack: StackSpec, then: str) -> None:
        """A service stack's queues are named after it: a rename or a delete would strand
        their messages; ``then`` says what to do instead."""
        orchestrator = stack.component(ComponentType.ORCHESTRATOR)
        if get_flavor(orchestrator.type, orchestrator.flavor).embedded:
            return
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM runs WHERE stack_id = ? AND status IN ('pending', 'running')",
            (stack.id,),
        )
        if row is not None and row[0]:
            raise ConflictError(
                f"stack {stack.name!r} has {row[0]} unfinished run(s) in queues named after it; "
                + then
            )

    async def copy_stack(self, source: str, target: str) -> StackSpec:
        """A new stack ``target`` with the same components as ``source``."""
        async with self.db.transaction() as conn:
            stack = await self.get(source)
            await self._check_free(target)
            copy = StackSpec(
                id=new_id(),
                name=target,
                components=dict(stack.components),
                owner=self.actor.name,
                created=utcnow(),
            )
            await self.store.save_stack(conn, copy)
        return copy

    async def deletable(self, name: str) -> StackSpec:
        """The stack ``name`` if the rules let it be deleted, else the ConflictError why not."""
        stack = await self._deletable(name)
        await self._check_no_consumers_before_delete(stack, await self._pools(stack))
        return stack

    async def _check_no_consumers_before_delete(
        self, stack: StackSpec, pools: list[str]
    ) -> QueueCheck:
        """Refuse while anything consumes the queues of ``stack``; what its broker answered."""
        from conveyor.service.queue_moves import check_no_consumers

        # A broker that is gone for good must not keep its stack: once deleted, nothing can
        # send runs to that stack's queues, whereas a renamed stack's runs would wait there.
        return await check_no_consumers(
            stack, "deleted", "stop them, then delete it", pools=pools, unchecked_ok=True
        )

    async def _pools(self, stack: StackSpec) -> list[str]:
        """The pools of the runs of ``stack`` whose step queues a change of it looks at."""
        from conveyor.service.queue_moves import MAX_CHECKED_POOLS

        return await self.store.pools_used(stack.id, MAX_CHECKED_POOLS)

    async def _deletable(self, name: str) -> StackSpec:
        """The stack ``name`` if the rules in the store let it be deleted."""
        stack = await self._changeable(name, unless_default="deleted")
        if stack.name == os.environ.get(STACK_ENV):
            raise ConflictError(
                f"stack {stack.name!r} is the active stack (through ${STACK_ENV}); "
                "unset it and activate another stack first"
            )
        if stack.name == (await self.store.setting(self._active_key) or DEFAULT):
            raise ConflictError(
                f"stack {stack.name!r} is the active stack; activate another stack first"
            )
        await self._check_no_queued_work(
            stack, "delete it once they finish (conveyor run cancel stops one)"
        )
        return stack

    async def delete_stack(self, name: str) -> None:
        """Delete a stack, not its components; never the default or the active stack, nor a
        service stack whose queues are consumed."""
        from conveyor.service.queue_moves import after_move

        stack = await self._deletable(name)
        pools = await self._pools(stack)
        # Outside the write transaction: a slow broker must not lock the store.
        check = await self._check_no_consumers_before_delete(stack, pools)
        async with self.db.transaction() as conn:
            current = await self._deletable(name)
            _check_unchanged(stack, current)
            await self.store.delete_stack(conn, current.id)
        await after_move(stack, pools, "deleted", check)

    async def activate(self, name: str) -> StackSpec:
        """Make ``name`` this client's active stack (``$CONVEYOR_STACK`` still wins)."""
        async with self.db.transaction() as conn:
            stack = await self.get(name)
            await self.store.set_setting(conn, self._active_key, stack.name)
        return stack

    @property
    def _active_key(self) -> str:
        return active_stack_key(self.actor.name)

    async def _changeable(self, name: str, unless_default: str | None = None) -> StackSpec:
        """The stack ``name`` if this actor may change it. With ``unless_default`` (what
        cannot be done to the default stack), the default stack is refused first: that
        rule holds for everyone, so everyone is told the same."""
        stack = await self.get(name)
        if unless_default is not None and stack.name == DEFAULT:
            raise ConflictError(f"the default stack cannot be {unless_default}")
        self.actor.check_change(f"stack {stack.name!r}", stack.owner)
        return stack

    async def _shared(
        self, conn: aiosqlite.Connection, stack: StackSpec, shared: bool
    ) -> StackSpec:
        """``stack`` shared (with its components: a stack is of use only with them) or not
        (its components stay as they are: other stacks may share them)."""
        if not shared:
            return stack.model_copy(update={"shared": False})
        components = {}
        for type_, component in stack.components.items():
            if not component.shared:
                self.actor.check_change(f"{label(type_)} {component.name!r}", component.owner)
                component = component.model_copy(update={"shared": True})
                await self.store.save_component(conn, component)
            components[type_] = component
        return stack.model_copy(update={"shared": True, "components": components})

    async def share_stack(self, name: str, shared: bool = True) -> StackSpec:
        """Make a stack usable by every user (and its components), or by its owner only."""
        async with self.db.transaction() as conn:
            stack = await self._shared(conn, await self._changeable(name), shared)
            await self.store.save_stack(conn, stack)
        return stack

    # --- files ---

    async def export_stack(self, name: str, include_secrets: bool = False) -> dict[str, Any]:
        """The stack as plain data for a file; secrets masked unless ``include_secrets``."""
        from conveyor.service.stack_files import export_data

        return export_data(await self.get(name), include_secrets=include_secrets)

    async def import_stack(self, data: Any, name: str | None = None) -> StackSpec:
        """Recreate an exported stack, as ``name`` if given.

        A component of the same type, name, flavor and configuration is reused; one that does
        not exist is created; a different one of the same name makes a new component with a
        free name (``NAME-2``...), so nothing existing changes.
        """
        from conveyor.service.stack_files import parse_export

        export = parse_export(data)
        stack_name = name or export.stack_name
        missing = [label(t) for t in REQUIRED_TYPES if t not in export.components]
        if missing:
            raise ValidationError(f"the export has no {', '.join(missing)}")
        async with self.db.transaction() as conn:
            if await self.store.stack(stack_name) is not None:
                raise ConflictError(
                    f"stack {stack_name!r} exists already; import it under another name"
                )
            check_name("stack", stack_name)
            components = {}
            for type_, exported in sorted(export.components.items()):
                component = await self._reuse(type_, exported)
                if component is None:
                    component = await self._new_component(type_, exported)
                    await self.store.save_component(conn, component)
                components[type_] = component
            stack = StackSpec(
                id=new_id(),
                name=stack_name,
                components=components,
                owner=self.actor.name,
                created=utcnow(),
            )
            await self.store.save_stack(conn, stack)
        return stack

    async def _reuse(
        self, type_: ComponentType, exported: ExportedComponent
    ) -> ComponentSpec | None:
        existing = await self.store.component(type_, exported.name)
        if existing is None or not self.actor.may_see(existing.owner, existing.shared):
            return None
        if existing.flavor != exported.flavor:
            return None
        if masked_paths(exported.configuration):
            return existing if exported.configuration == exported_config(existing) else None
        config = get_flavor(type_, exported.flavor).normalize(exported.configuration)
        return existing if config == existing.config else None

    async def _new_component(
        self, type_: ComponentType, exported: ExportedComponent
    ) -> ComponentSpec:
        masked = masked_paths(exported.configuration)
        if masked:
            raise ValidationError(
                f"{label(type_)} {exported.name!r} was exported with its secrets masked "
                f"({', '.join(masked)}): export with --include-secrets, or register the "
                "component with its secrets first and import again"
            )
        check_name(label(type_), exported.name)
        config = get_flavor(type_, exported.flavor).normalize(exported.configuration)
        name, n = exported.name, 1
        while await self.store.component(type_, name) is not None:
            n += 1
            name = f"{exported.name}-{n}"
        return ComponentSpec(
            id=new_id(),
            type=type_,
            name=name,
            flavor=exported.flavor,
            config=config,
            owner=self.actor.name,
            created=utcnow(),
        )
