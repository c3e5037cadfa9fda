"""``/api/artifacts``: metadata, a preview of small values, and downloads inside the store."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from conveyor.contracts import ArtifactRecord
from conveyor.service.api.artifact_files import (
    download_response,
    open_artifact,
    preview_artifact,
)
from conveyor.service.api.schemas import ArtifactPreview, Page, Paging
from conveyor.service.api.security import require_user
from conveyor.service.api.state import ApiState, state_of

router = APIRouter(prefix="/api", dependencies=[Depends(require_user)], tags=["artifacts"])


@router.get("/artifacts", response_model=Page[ArtifactRecord])
async def list_artifacts(
    run_id: str | None = None,
    paging: Paging = Depends(),
    state: ApiState = Depends(state_of),
) -> Page[ArtifactRecord]:
    """Step outputs, newest first; filter by run."""
    runs = state.services.runs
    full_id = (await runs.get_run(run_id)).id if run_id else None
    found = await state.services.artifacts.list_artifacts(
        run_id=full_id, limit=paging.limit + 1, offset=paging.offset
    )
    return paging.page(found)


@router.get("/artifacts/{artifact_id}", response_model=ArtifactRecord)
async def get_artifact(artifact_id: str, state: ApiState = Depends(state_of)) -> ArtifactRecord:
    """An artifact's metadata: its run and step, type, size, digest and location."""
    return await state.services.artifacts.get_artifact(artifact_id)


@router.get("/artifacts/{artifact_id}/preview", response_model=ArtifactPreview)
async def get_preview(artifact_id: str, state: ApiState = Depends(state_of)) -> ArtifactPreview:
    """A readable look at a small JSON, str or numpy value (never unpickles)."""
    return await preview_artifact(state.services, artifact_id)


@router.get(
    "/artifacts/{artifact_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(artifact_id: str, state: ApiState = Depends(state_of)) -> StreamingResponse:
    """The stored bytes, checked against their digest (403 for a path outside the store)."""
    return download_response(await open_artifact(state.services, artifact_id))
