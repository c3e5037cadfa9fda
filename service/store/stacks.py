"""Stacks, components and client settings in the metadata store."""

from __future__ import annotations

import json
from datetime import datetime

import aiosqlite

from conveyor.contracts import ComponentSpec, ComponentType, StackSpec
from conveyor.service.store.db import Database


def _component(row: aiosqlite.Row) -> ComponentSpec:
    return ComponentSpec(
        id=row["id"],
        type=ComponentType(row["type"]),
        name=row["name"],
        flavor=row["flavor"],
        config=json.loads(row["config"]),
        owner=row["owner"],
        shared=bool(row["shared"]),
        created=datetime.fromisoformat(row["created"]),
    )


class StackStore:
    """Rows of stacks and components; the rules live in ``service.stacks``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def components(self, type_: ComponentType | None = None) -> list[ComponentSpec]:
        if type_ is None:
            rows = await self.db.fetchall("SELECT * FROM components ORDER BY type, name")
        else:
            rows = await self.db.fetchall(
                "SELECT * FROM components WHERE type = ? ORDER BY name", (type_.value,)
            )
        return [_component(row) for row in rows]

    async def component(self, type_: ComponentType, name: str) -> ComponentSpec | None:
        row = await self.db.fetchone(
            "SELECT * FROM components WHERE type = ? AND name = ?", (type_.value, name)
        )
        return _component(row) if row else None

    async def save_component(self, conn: aiosqlite.Connection, c: ComponentSpec) -> None:
        """Insert or replace a component row (by id)."""
        await conn.execute(
            "INSERT INTO components (id, type, name, flavor, config, owner, shared, created)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
            " flavor = excluded.flavor, config = excluded.config, shared = excluded.shared",
            (
                c.id,
                c.type.value,
                c.name,
                c.flavor,
                json.dumps(c.config),
                c.owner,
                int(c.shared),
                (c.created or datetime.now()).isoformat(),
            ),
        )

    async def delete_component(self, conn: aiosqlite.Connection, component_id: str) -> None:
        await conn.execute("DELETE FROM components WHERE id = ?", (component_id,))

    async def stacks(self) -> list[StackSpec]:
        rows = await self.db.fetchall("SELECT * FROM stacks ORDER BY created, name")
        members = await self.db.fetchall(
            "SELECT sc.stack_id, c.* FROM stack_components sc"
            " JOIN components c ON c.id = sc.component_id"
        )
        by_stack: dict[str, dict[ComponentType, ComponentSpec]] = {}
        for member in members:
            component = _component(member)
            by_stack.setdefault(member["stack_id"], {})[component.type] = component
        return [
            StackSpec(
                id=row["id"],
                name=row["name"],
                components=by_stack.get(row["id"], {}),
                owner=row["owner"],
                shared=bool(row["shared"]),
                created=datetime.fromisoformat(row["created"]),
            )
            for row in rows
        ]

    async def stack(self, name: str) -> StackSpec | None:
        for stack in await self.stacks():
            if stack.name == name:
                return stack
        return None

    async def save_stack(self, conn: aiosqlite.Connection, s: StackSpec) -> None:
        """Insert or replace a stack row and its component links (by id)."""
        await conn.execute(
            "INSERT INTO stacks (id, name, owner, shared, created) VALUES (?,?,?,?,?)"
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, shared = excluded.shared",
            (s.id, s.name, s.owner, int(s.shared), (s.created or datetime.now()).isoformat()),
        )
        await conn.execute("DELETE FROM stack_components WHERE stack_id = ?", (s.id,))
        await conn.executemany(
            "INSERT INTO stack_components (stack_id, type, component_id) VALUES (?,?,?)",
            [(s.id, t.value, c.id) for t, c in s.components.items()],
        )

    async def pools_used(self, stack_id: str, limit: int) -> list[str]:
        """The step pools named by runs recorded on the stack ``stack_id``, at most ``limit``
        of them (by name)."""
        rows = await self.db.fetchall(
            "SELECT pool FROM stack_pools WHERE stack_id = ? ORDER BY pool LIMIT ?",
            (stack_id, limit),
        )
        return [row["pool"] for row in rows]

    async def delete_stack(self, conn: aiosqlite.Connection, stack_id: str) -> None:
        await conn.execute("DELETE FROM stacks WHERE id = ?", (stack_id,))

    async def rename_setting_values(
        self, conn: aiosqlite.Connection, key: str, key_prefix: str, old: str, new: str
    ) -> None:
        """Set ``new`` where the setting ``key``, or one whose key starts with ``key_prefix``
        (one per user), holds ``old``."""
        await conn.execute(
            "UPDATE settings SET value = ? WHERE value = ? AND (key = ? OR substr(key, 1, ?) = ?)",
            (new, old, key, len(key_prefix), key_prefix),
        )

    async def setting(self, key: str) -> str | None:
        row = await self.db.fetchone("SELECT value FROM settings WHERE key = ?", (key,))
        return row["value"] if row else None

    async def set_setting(self, conn: aiosqlite.Connection, key: str, value: str) -> None:
        await conn.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
