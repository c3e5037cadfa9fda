"""Component rules, the component half of ``StackService``.

Names are unique per component type, a flavor's config is validated on every write, and a
component that a stack uses cannot be deleted. Writes check and change inside one
transaction, so a refused change leaves everything as it was.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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
from conveyor.service.store import Database, StackStore
from conveyor.workers.flavors import Flavor, flavors_of, get_flavor

if TYPE_CHECKING:
    from conveyor.service.users import Actor

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the closest names, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def check_name(kind: str, name: str) -> None:
    """Names end up in queue names and file names: keep them to a safe alphabet."""
    if not _NAME.match(name):
        raise ValidationError(
            f"invalid {kind} name {shown(name)}: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit, at most 100 characters"
        )


def parse_type(value: ComponentType | str) -> ComponentType:
    """A component type from its value, also spelled as on the command line (artifact-store)."""
    if isinstance(value, ComponentType):
        return value
    try:
        return ComponentType(value.strip().lower().replace("-", "_"))
    except ValueError:
        valid = ", ".join(t.value for t in ComponentType)
        raise ValidationError(f"unknown component type {shown(value)} (valid: {valid})") from None


class ComponentRules:
    """Register, update, rename and delete stack components under the rules."""

    db: Database
    store: StackStore
    actor: Actor

    async def list_components(self, type_: ComponentType | None = None) -> list[ComponentSpec]:
        """Every component this actor may see, or those of ``type_``, by name."""
        found = await self.store.components(type_)
        return [c for c in found if self.actor.may_see(c.owner, c.shared)]

    async def list_flavors(self, type_: ComponentType | None = None) -> list[Flavor]:
        """The flavors a component of ``type_`` (or of any type) can have."""
        types = [type_] if type_ is not None else list(ComponentType)
        return [f for t in types for f in flavors_of(t)]

    async def get_component(self, type_: ComponentType, name: str) -> ComponentSpec:
        """The component of ``type_`` called ``name`` (or with that id) if this actor may see
        it; the error suggests names (of visible components only)."""
        components = await self.list_components(type_)
        for component in components:
            if component.name == name:
                return component
        for component in components:
            if component.id == name:
                return component
        names = (c.name for c in components)
        raise NotFoundError(f"no {label(type_)} named {shown(name)}{suggest(name, names)}")

    async def stacks_using(self, component_id: str) -> list[str]:
        """Names of the stacks that include the component."""
        return [s.name for s in await self._stacks_with(component_id)]

    async def _stacks_with(self, component_id: str) -> list[StackSpec]:
        """The stacks that include the component."""
        return [
            s
            for s in await self.store.stacks()
            if any(c.id == component_id for c in s.components.values())
        ]

    async def register_component(
        self,
        type_: ComponentType,
        name: str,
        flavor: str,
        config: dict[str, Any] | None = None,
        shared: bool = False,
    ) -> ComponentSpec:
        """Create a component owned by this actor (``shared``: usable by every user); refuses
        an existing name, an unknown flavor, an invalid config."""
        check_name(label(type_), name)
        normalized = get_flavor(type_, flavor).normalize(config or {})
        async with self.db.transaction() as conn:
            existing = await self.store.component(type_, name)
            if existing is not None:
                raise ConflictError(
                    f"{label(type_)} {name!r} exists already (flavor {existing.flavor!r}); "
                    "choose another name, or update that one"
                )
            component = ComponentSpec(
                id=new_id(),
                type=type_,
                name=name,
                flavor=flavor,
                config=normalized,
                owner=self.actor.name,
                shared=shared,
                created=utcnow(),
            )
            await self.store.save_component(conn, component)
        return component

    async def update_component(
        self, type_: ComponentType, name: str, config: dict[str, Any]
    ) -> ComponentSpec:
        """Set the given config keys (a ``None`` value removes a key, back to its default)."""
        # Imported here: moving queues is for the changes that may, not for listing stacks.
        from conveyor.service.queue_moves import MAX_CHECKED_POOLS, after_move, check_queues_kept

        if not config:
            raise ValidationError(f"nothing to update on {label(type_)} {name!r}: give a key")
        component = await self._changeable_component(type_, name)
        updated = self._updated(component, config)
        moved = []
        # Outside the write transaction: a slow broker must not lock the store.
        for stack in await self._stacks_with(component.id):
            after = stack.model_copy(update={"components": {**stack.components, type_: updated}})
            pools = await self.store.pools_used(stack.id, MAX_CHECKED_POOLS)
            check = await check_queues_kept(stack, after, pools)
            if check is not None:
                moved.append((stack, pools, check))
        async with self.db.transaction() as conn:
            if await self._changeable_component(type_, name) != component:
                raise ConflictError(
                    f"{label(type_)} {component.name!r} changed while the queues of its "
                    "stacks were checked; try again"
                )
            await self.store.save_component(conn, updated)
        for stack, pools, check in moved:
            await after_move(stack, pools, "moved to other queues", check)
        return updated

    @staticmethod
    def _updated(component: ComponentSpec, config: dict[str, Any]) -> ComponentSpec:
        merged = {k: v for k, v in {**component.config, **config}.items() if v is not None}
        normalized = get_flavor(component.type, component.flavor).normalize(merged)
        return component.model_copy(update={"config": normalized})

    async def rename_component(
        self, type_: ComponentType, name: str, new_name: str
    ) -> ComponentSpec:
        """Rename a component; the stacks that use it follow (they refer to it by id)."""
        check_name(label(type_), new_name)
        async with self.db.transaction() as conn:
            component = await self._changeable_component(type_, name)
            if new_name != component.name and await self.store.component(type_, new_name):
                raise ConflictError(f"{label(type_)} {new_name!r} exists already")
            renamed = component.model_copy(update={"name": new_name})
            await self.store.save_component(conn, renamed)
        return renamed

    async def deletable_component(self, type_: ComponentType, name: str) -> ComponentSpec:
        """The component ``name`` if the rules let it be deleted, else the error why not."""
        component = await self._changeable_component(type_, name)
        users = await self.stacks_using(component.id)
        if users:
            raise ConflictError(
                f"{label(type_)} {component.name!r} is used by stack"
                f"{'s' if len(users) > 1 else ''} {', '.join(repr(u) for u in users)}; "
                "remove it from "
                f"{'those stacks' if len(users) > 1 else 'that stack'} or delete "
                f"{'them' if len(users) > 1 else 'it'} first"
            )
        return component

    async def delete_component(self, type_: ComponentType, name: str) -> None:
        """Delete a component that no stack uses; the error names the stacks that do."""
        async with self.db.transaction() as conn:
            component = await self.deletable_component(type_, name)
            await self.store.delete_component(conn, component.id)

    async def _changeable_component(self, type_: ComponentType, name: str) -> ComponentSpec:
        component = await self.get_component(type_, name)
        self.actor.check_change(f"{label(type_)} {component.name!r}", component.owner)
        return component

    async def share_component(self, type_: ComponentType, name: str, shared: bool) -> ComponentSpec:
        """Make a component usable by every user (``shared``) or by its owner only."""
        async with self.db.transaction() as conn:
            component = await self._changeable_component(type_, name)
            changed = component.model_copy(update={"shared": shared})
            await self.store.save_component(conn, changed)
        return changed
