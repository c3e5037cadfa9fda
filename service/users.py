"""Users and their tokens: who acts, what they may see and change, and token bookkeeping.

A token is 32 random bytes (``cvy_`` plus URL-safe base64), shown once when it is made; the
store keeps only its sha256, so a copy of the database logs nobody in. A person and a
service account (CI) are both users: a service account is a member with its own token.

On a client's own home nobody logs in: every call acts as the local admin, ``default``, who
owns the default stack and every record made before users existed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from conveyor.contracts import (
    ConflictError,
    NotAllowed,
    NotFoundError,
    Role,
    UserRecord,
    utcnow,
)
from conveyor.contracts.errors import shown
from conveyor.service.components import check_name, suggest
from conveyor.service.store import Database, UserStore

LOCAL_USER = "default"
"""The user every call on a client's own home acts as; the server's bootstrapped admin."""
TOKEN_PREFIX = "cvy_"
MAX_TOKEN_LENGTH = 200
"""The longest token looked at (longer ones are refused before hashing)."""


@dataclass(frozen=True)
class Actor:
    """Who a call acts for: a user name and whether they are an admin."""

    name: str
    admin: bool

    def may_see(self, owner: str, shared: bool) -> bool:
        """A shared record is everyone's; a private one its owner's and the admins'."""
        return shared or self.admin or owner == self.name

    def may_change(self, owner: str) -> bool:
        """Only the owner or an admin changes or deletes a record."""
        return self.admin or owner == self.name

    def check_change(self, what: str, owner: str) -> None:
        """Raise ``NotAllowed`` unless this actor may change ``what`` (owned by ``owner``)."""
        if not self.may_change(owner):
            raise NotAllowed(
                f"{what} belongs to user {owner!r}; only its owner or an admin may change it"
            )

    def check_admin(self, what: str) -> None:
        if not self.admin:
            raise NotAllowed(f"only an admin may {what}")


LOCAL_ADMIN = Actor(LOCAL_USER, admin=True)


def new_token() -> str:
    """A fresh token: 256 random bits, prefixed so that a leaked one is recognisable."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a token (a fast hash suffices: the token is high-entropy)."""
    return hashlib.sha256(token.encode()).hexdigest()


def actor_of(user: UserRecord) -> Actor:
    return Actor(user.name, admin=user.role is Role.ADMIN)


class UserService:
    """Create, list, delete users and rotate their tokens; find the user of a token."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.store = UserStore(db)

    async def list_users(self) -> list[UserRecord]:
        return await self.store.users()

    async def get(self, name: str) -> UserRecord:
        user = await self.store.user(name)
        if user is None:
            names = [u.name for u in await self.store.users()]
            raise NotFoundError(f"no user named {shown(name)}{suggest(name, names)}")
        return user

    async def create(self, name: str, role: Role = Role.MEMBER) -> tuple[UserRecord, str]:
        """A new user and their token (the only time the token is known)."""
        check_name("user", name)
        token = new_token()
        async with self.db.transaction() as conn:
            if await self.store.user(name) is not None:
                raise ConflictError(f"user {name!r} exists already; choose another name")
            user = UserRecord(name=name, role=role, created=utcnow())
            await self.store.save(conn, user, token_hash(token))
        return user, token

    async def rotate_token(self, name: str) -> str:
        """A new token for ``name``; the old one stops working at once."""
        token = new_token()
        async with self.db.transaction() as conn:
            user = await self.get(name)
            await self.store.save(conn, user, token_hash(token))
        return token

    async def delete(self, name: str) -> None:
        """Delete a user (their stacks and runs stay, under their name); never the last admin."""
        async with self.db.transaction() as conn:
            user = await self.get(name)
            if user.role is Role.ADMIN and await self.store.admins() <= 1:
                raise ConflictError(f"user {name!r} is the last admin; make another admin first")
            await self.store.delete(conn, name)

    async def authenticate(self, token: str) -> UserRecord | None:
        """The user whose token this is, or None (wrong, rotated, or of a deleted user)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = token_hash(token)
        found = await self.store.by_token_hash(digest)
        if found is None:
            return None
        user, stored = found
        return user if hmac.compare_digest(digest, stored) else None

    async def ensure_admin(self, token: str | None = None) -> str | None:
        """Make sure the server has its admin, ``default``.

        With a ``token`` (``$CONVEYOR_ADMIN_TOKEN`` or ``$CONVEYOR_SERVER_TOKEN``), that is the
        admin's token from now on. Without one, an admin is created on first use only, with a
        new token, which is returned to be shown once; otherwise None.
        """
        async with self.db.transaction() as conn:
            existing = await self.store.user(LOCAL_USER)
            if token is not None:
                user = existing or UserRecord(name=LOCAL_USER, role=Role.ADMIN, created=utcnow())
                admin = user.model_copy(update={"role": Role.ADMIN})
                await self.store.save(conn, admin, token_hash(token))
                return None
            if existing is not None or await self.store.admins() > 0:
                return None
            created = new_token()
            admin = UserRecord(name=LOCAL_USER, role=Role.ADMIN, created=utcnow())
            await self.store.save(conn, admin, token_hash(created))
            return created

    async def session_key(self, name: str) -> bytes | None:
        """A key that proves a dashboard session of ``name``: it changes when their token
        does, and is gone when they are; None for an unknown user."""
        digest = await self.store.token_hash_of(name)
        return digest.encode() if digest is not None else None
