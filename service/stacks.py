"""Stack rules: the default stack, the active stack, and lookups with suggestions."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

from conveyor.contracts import (
    ComponentSpec,
    ComponentType,
    NotFoundError,
    StackSpec,
    new_id,
    utcnow,
)
from conveyor.service.home import STACK_ENV, Home
from conveyor.service.store import Database, StackStore

DEFAULT = "default"
ACTIVE_STACK_KEY = "active_stack"


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the closest names, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class StackService:
    """Reads stacks and knows which one is active."""

    def __init__(self, db: Database, home: Home) -> None:
        self.db = db
        self.home = home
        self.store = StackStore(db)

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

    async def get(self, name: str) -> StackSpec:
        """The stack called ``name``; the error suggests the closest names."""
        stacks = await self.store.stacks()
        for stack in stacks:
            if stack.name == name:
                return stack
        raise NotFoundError(f"no stack named {name!r}{suggest(name, (s.name for s in stacks))}")

    async def active_name(self) -> str:
        """$CONVEYOR_STACK, else the client's chosen stack, else the default stack."""
        return os.environ.get(STACK_ENV) or await self.store.setting(ACTIVE_STACK_KEY) or DEFAULT

    async def resolve(self, name: str | None = None) -> StackSpec:
        """The stack a command works on: ``name`` if given, else the active stack."""
        return await self.get(name or await self.active_name())
