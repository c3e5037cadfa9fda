"""Users of a server in the metadata store: names, roles and the digests of their tokens."""

from __future__ import annotations

from datetime import datetime

import aiosqlite

from conveyor.contracts import Role, UserRecord
from conveyor.service.store.db import Database

_COLUMNS = "name, role, created, token_expires"


def _user(row: aiosqlite.Row) -> UserRecord:
    expires = row["token_expires"]
    return UserRecord(
        name=row["name"],
        role=Role(row["role"]),
        created=datetime.fromisoformat(row["created"]),
        token_expires=datetime.fromisoformat(expires) if expires else None,
    )


class UserStore:
    """Rows of users; the rules (and the tokens themselves) live in ``service.users``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def users(self) -> list[UserRecord]:
        rows = await self.db.fetchall(f"SELECT {_COLUMNS} FROM users ORDER BY name")
        return [_user(row) for row in rows]

    async def user(self, name: str) -> UserRecord | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,))
        return _user(row) if row else None

    async def by_token_hash(self, token_hash: str) -> tuple[UserRecord, str] | None:
        """The user whose token has this digest, and the stored digest to compare it with."""
        row = await self.db.fetchone("SELECT * FROM users WHERE token_hash = ?", (token_hash,))
        return (_user(row), row["token_hash"]) if row else None

    async def token_hash_of(self, name: str) -> str | None:
        row = await self.db.fetchone("SELECT token_hash FROM users WHERE name = ?", (name,))
        return str(row["token_hash"]) if row else None

    async def save(self, conn: aiosqlite.Connection, user: UserRecord, token_hash: str) -> None:
        """Insert a user, or set the role, token digest and token expiry of an existing one."""
        expires = user.token_expires.isoformat() if user.token_expires else None
        await conn.execute(
            "INSERT INTO users (name, role, token_hash, created, token_expires)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET role = excluded.role,"
            " token_hash = excluded.token_hash, token_expires = excluded.token_expires",
            (user.name, user.role.value, token_hash, user.created.isoformat(), expires),
        )

    async def delete(self, conn: aiosqlite.Connection, name: str) -> None:
        await conn.execute("DELETE FROM users WHERE name = ?", (name,))

    async def admins(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM users WHERE role = 'admin'")
        return int(row[0]) if row else 0
