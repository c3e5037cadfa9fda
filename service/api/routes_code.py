"""``/api/code``: code archives a logged-in client uploads before it submits a compiled run.

``PUT /api/code/{digest}?stack=NAME`` takes the zip's bytes (at most the server's bound),
checks that they hash to ``digest`` and that the zip's entries are safe, and puts them into
the stack's artifact store, named by content: putting the same archive twice is harmless.
The answer is where the store keeps it, to set as the steps' ``code`` of the spec.
``GET`` of the same path answers the same for an archive the server took already, so that a
client does not upload an unchanged archive again.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from conveyor.contracts import BlobRef, NotFoundError
from conveyor.contracts.models import MAX_NAME_LENGTH
from conveyor.service.api.security import require_user
from conveyor.service.api.state import ApiState, settings_of, state_of
from conveyor.service.api.submitted_code import (
    MAX_CODE_BYTES_CEILING,
    checked_digest,
    receive_archive,
)
from conveyor.service.users import Actor
from conveyor.workers.flavors import make_artifact_store

router = APIRouter(prefix="/api", dependencies=[Depends(require_user)])


@router.get("/code/{digest}", response_model=BlobRef, tags=["runs"])
async def get_code(
    digest: str,
    stack: str | None = Query(None, max_length=MAX_NAME_LENGTH, description="Default: served"),
    state: ApiState = Depends(state_of),
    actor: Actor = Depends(require_user),
) -> BlobRef:
    """Where a code archive this server took (or found) is in a stack's store, so that a
    client uploads it only once; 404 when the server does not know it (upload it then)."""
    checked_digest(digest)
    target = await state.gateway.stack_named(state.services.as_user(actor).stacks, stack)
    found = state.archives.get(target.id, digest)
    if found is None:
        raise NotFoundError(f"this server has not taken code archive {digest} for {target.name!r}")
    return found


@router.put(
    "/code/{digest}",
    response_model=BlobRef,
    tags=["runs"],
    # The route reads its body itself, bounded by the server's --max-code-mb; the app's
    # 1 MiB does not apply here.
    max_body_size=MAX_CODE_BYTES_CEILING,
    openapi_extra={"requestBody": {"content": {"application/zip": {"schema": {"type": "string"}}}}},
)
async def put_code(
    digest: str,
    request: Request,
    stack: str | None = Query(None, max_length=MAX_NAME_LENGTH, description="Default: served"),
    state: ApiState = Depends(state_of),
    actor: Actor = Depends(require_user),
) -> BlobRef:
    """Store a code archive (a zip) in a stack's artifact store, under its content digest.

    422 if the bytes do not hash to ``digest`` or are not a safe zip, 413 over the server's
    bound, 404 for a stack the user may not see."""
    checked_digest(digest)
    target = await state.gateway.stack_named(state.services.as_user(actor).stacks, stack)
    limit = settings_of(request).max_code_bytes
    blob = await receive_archive(request.stream(), digest, make_artifact_store(target), limit)
    state.archives.add(target.id, blob)
    return blob
