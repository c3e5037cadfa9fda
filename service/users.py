"""Users and their tokens: who acts, what they may see and change, and token bookkeeping.

A token is 32 random bytes (``cvy_`` plus URL-safe base64), shown once when it is made; the
store keeps only its sha256, so a copy of the database logs nobody in. A token may be given
a lifetime when it is made (``expires_in``, e.g. ``30d``); without one it works until it is
rotated or its user deleted (a service account's token for CI should not stop on a date
nobody remembers; give people's tokens a lifetime where policy wants one). A person and a
service account (CI) are both users: a service account is a member with its own token.

On a client's own home nobody logs in: every call acts as the local admin, ``default``, who
owns the default stack and every record made before users existed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.contracts import (
    ConflictError,
    NotAllowed,
    NotFoundError,
    Role,
    UserRecord,
    ValidationError,
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
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
MIN_LIFETIME = timedelta(hours=1)
MAX_LIFETIME = timedelta(days=366)
"""Bounds of a token's lifetime (``--expires-in``)."""


def parse_lifetime(text: str) -> timedelta:
    """A token's lifetime from ``12h``, ``30d`` or ``2w`` (whole numbers; h, d or w), within
    ``MIN_LIFETIME`` and ``MAX_LIFETIME``."""
    found = re.fullmatch(r"([0-9]{1,6})([hdw])", text.strip().lower()) if len(text) < 20 else None
    if found is None:
        raise ValidationError(
            f"a token lifetime is a whole number and a unit, h, d or w (as 12h, 30d, 2w); "
            f"got {shown(text)}"
        )
    lifetime = int(found.group(1)) * _UNITS[found.group(2)]
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        raise ValidationError(
            f"a token lifetime is from 1h to 366d; got {shown(text)} (without --expires-in "
            "a token works until it is rotated)"
        )
    return lifetime


def _expiry(expires_in: str | None) -> datetime | None:
    return utcnow() + parse_lifetime(expires_in) if expires_in is not None else None


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


def code_refused(stack: str, runnable: list[str]) -> str:
    """Why a member's run on the embedded ``stack`` is refused, and where it would run:
    ``runnable``, the stacks they may use whose workers run the code they upload."""
    where = (
        f"stacks that take your runs: {', '.join(runnable)} (conveyor stack set NAME makes "
        "one active, or conveyor pipeline run --stack NAME)"
        if runnable
        else "no stack you may use takes your runs yet: register one with a rabbitmq "
        "orchestrator (docs/scale-out.md), or ask an admin to share one (conveyor stack share "
        "NAME)"
    )
    return (
        f"stack {stack!r} is embedded (a local orchestrator): it runs its steps inside the "
        f"server's process, where code a member uploads never runs; {where}"
    )


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

    async def create(
        self, name: str, role: Role = Role.MEMBER, expires_in: str | None = None
    ) -> tuple[UserRecord, str]:
        """A new user and their token (the only time the token is known), which stops
        working after ``expires_in`` (``parse_lifetime``) if given."""
        check_name("user", name)
        expires = _expiry(expires_in)
        token = new_token()
        async with self.db.transaction() as conn:
            if await self.store.user(name) is not None:
                raise ConflictError(f"user {name!r} exists already; choose another name")
            user = UserRecord(name=name, role=role, created=utcnow(), token_expires=expires)
            await self.store.save(conn, user, token_hash(token))
        return user, token

    async def rotate_token(
        self, name: str, expires_in: str | None = None
    ) -> tuple[UserRecord, str]:
        """A new token for ``name`` (with a lifetime if ``expires_in``; else none); the old
        one stops working at once."""
        expires = _expiry(expires_in)
        token = new_token()
        async with self.db.transaction() as conn:
            user = (await self.get(name)).model_copy(update={"token_expires": expires})
            await self.store.save(conn, user, token_hash(token))
        return user, token

    async def delete(self, name: str) -> None:
        """Delete a user (their stacks and runs stay, under their name); never the last admin."""
        async with self.db.transaction() as conn:
            user = await self.get(name)
            if user.role is Role.ADMIN and await self.store.admins() <= 1:
                raise ConflictError(f"user {name!r} is the last admin; make another admin first")
            await self.store.delete(conn, name)

    async def authenticate(self, token: str) -> UserRecord | None:
        """The user whose token this is, or None (wrong, expired, rotated, or of a deleted
        user)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = token_hash(token)
        found = await self.store.by_token_hash(digest)
        if found is None:
            return None
        user, stored = found
        if user.token_expires is not None and user.token_expires <= utcnow():
            return None
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
                admin = user.model_copy(update={"role": Role.ADMIN, "token_expires": None})
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
        does, and is gone when they are or their token expired; None then."""
        user = await self.store.user(name)
        if user is None or (user.token_expires is not None and user.token_expires <= utcnow()):
            return None
        digest = await self.store.token_hash_of(name)
        return digest.encode() if digest is not None else None
