"""``/api/me`` and ``/api/users``: who a token belongs to, and users and tokens (admins).

A token leaves the server once, in the answer that makes it (a new user, a rotation); no
other answer, and no log line, holds one.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from conveyor.contracts import Role, UserRecord
from conveyor.service.api.schemas import TokenLifetime, UserName
from conveyor.service.api.security import api_services, require_user
from conveyor.service.api.state import ApiState, state_of
from conveyor.service.api.submitted_code import stacks_for_code
from conveyor.service.context import Services
from conveyor.service.users import Actor
from conveyor.service.version import conveyor_version

router = APIRouter(prefix="/api", tags=["users"])


class Me(BaseModel):
    """The user of the request's token, and the server's version (for ``conveyor status``)."""

    name: str
    role: Role
    active_stack: str
    active_stack_visible: bool = Field(
        description="false: the active stack is another user's private stack (or gone); "
        "the user must choose another one"
    )
    active_stack_runs_your_code: bool = Field(
        True,
        description="false: the active stack would refuse a run of the user's code: it is "
        "not visible to them, or embedded (a local orchestrator) and they a member (403)",
    )
    stacks_for_your_code: list[str] = Field(
        default_factory=list,
        description="The stacks the user may use whose workers run the code they upload",
    )
    server_version: str


class NewToken(BaseModel):
    """A user and their new token: the only time the server shows it."""

    user: UserRecord
    token: str


@router.get("/me", response_model=Me)
async def me(
    actor: Actor = Depends(require_user), services: Services = Depends(api_services)
) -> Me:
    active = await services.stacks.active_name()
    stacks = await services.stacks.list_stacks()
    runnable = stacks_for_code(stacks, actor.admin)
    return Me(
        name=actor.name,
        role=Role.ADMIN if actor.admin else Role.MEMBER,
        active_stack=active,
        active_stack_visible=active in {s.name for s in stacks},
        active_stack_runs_your_code=active in runnable,
        stacks_for_your_code=runnable,
        server_version=conveyor_version(),
    )


@router.get("/users", response_model=list[UserRecord])
async def list_users(
    actor: Actor = Depends(require_user), state: ApiState = Depends(state_of)
) -> list[UserRecord]:
    actor.check_admin("list users")
    return await state.services.users.list_users()


@router.post("/users", response_model=NewToken, status_code=201)
async def create_user(
    body: UserName, actor: Actor = Depends(require_user), state: ApiState = Depends(state_of)
) -> NewToken:
    """A new user (a person, or a service account for CI) and their token, shown once."""
    actor.check_admin("create users")
    role = Role.ADMIN if body.admin else Role.MEMBER
    user, token = await state.services.users.create(body.name, role, body.expires_in)
    return NewToken(user=user, token=token)


@router.delete("/users/{name}", status_code=204)
async def delete_user(
    name: str, actor: Actor = Depends(require_user), state: ApiState = Depends(state_of)
) -> Response:
    """Delete a user; their token gets 401 at once; their stacks and runs stay."""
    actor.check_admin("delete users")
    await state.services.users.delete(name)
    return Response(status_code=204)


@router.post("/users/{name}/rotate-token", response_model=NewToken)
async def rotate_token(
    name: str,
    body: TokenLifetime | None = None,
    actor: Actor = Depends(require_user),
    state: ApiState = Depends(state_of),
) -> NewToken:
    """A new token for ``name`` (an admin's task, or a user's for themselves)."""
    if name != actor.name:
        actor.check_admin("rotate another user's token")
    lifetime = body.expires_in if body is not None else None
    user, token = await state.services.users.rotate_token(name, lifetime)
    return NewToken(user=user, token=token)
