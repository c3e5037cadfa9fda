"""``/api/stacks``, ``/api/components`` and ``/api/flavors``: reads and changes under the rules.

Each route hands over to ``StackService``, which checks the rules and raises the errors that
the app's one handler turns into 404, 409 or 422; what leaves here is masked by ``views``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from conveyor.contracts import ComponentSpec, ComponentType, RunRecord, RunStatus
from conveyor.service.api import views
from conveyor.service.api.schemas import (
    CopyStack,
    ImportStack,
    Page,
    Paging,
    RegisterComponent,
    RegisterStack,
    Rename,
    Share,
    UpdateComponent,
    UpdateStack,
)
from conveyor.service.api.security import api_services, require_user
from conveyor.service.context import Services
from conveyor.service.public_records import ComponentView, FlavorInfo, StackView, flavor_info

router = APIRouter(prefix="/api", dependencies=[Depends(require_user)])


async def _shown(services: Services, stack_name: str) -> StackView:
    return await views.stack_view(services, stack_name)


# --- stacks ---


@router.get("/stacks", response_model=Page[StackView], tags=["stacks"])
async def list_stacks(
    paging: Paging = Depends(), services: Services = Depends(api_services)
) -> Page[StackView]:
    """Every stack (the columns of ``conveyor stack list``), oldest first."""
    return paging.slice(await views.stack_views(services))


@router.post("/stacks", response_model=StackView, status_code=201, tags=["stacks"])
async def register_stack(
    body: RegisterStack, services: Services = Depends(api_services)
) -> StackView:
    """Register a stack of existing components, by name; activate it if asked."""
    stack = await services.stacks.register_stack(
        body.name, body.components, activate=body.activate, shared=body.shared
    )
    return await _shown(services, stack.name)


@router.post("/stacks/import", response_model=StackView, status_code=201, tags=["stacks"])
async def import_stack(body: ImportStack, services: Services = Depends(api_services)) -> StackView:
    """Recreate a stack from what ``GET /api/stacks/{name}/export`` returned."""
    stack = await services.stacks.import_stack(body.data, name=body.name)
    return await _shown(services, stack.name)


@router.get("/stacks/{name}", response_model=StackView, tags=["stacks"])
async def get_stack(
    name: str,
    deletable: bool = Query(
        False, description="Refuse (as a DELETE would: 409, 403) unless it may be deleted"
    ),
    services: Services = Depends(api_services),
) -> StackView:
    """A stack's components, their flavors and masked configurations. With ``deletable``,
    only if the rules let it be deleted (its broker asked too): the CLI asks before its
    confirmation. A read: a server from before the flag ignores it and only answers."""
    if deletable:
        await services.stacks.deletable(name)
    return await _shown(services, name)


@router.patch("/stacks/{name}", response_model=StackView, tags=["stacks"])
async def update_stack(
    name: str, body: UpdateStack, services: Services = Depends(api_services)
) -> StackView:
    """Replace some components of a stack; past runs keep the ones they ran on."""
    stack = await services.stacks.update_stack(name, body.components)
    return await _shown(services, stack.name)


@router.post("/stacks/{name}/rename", response_model=StackView, tags=["stacks"])
async def rename_stack(
    name: str, body: Rename, services: Services = Depends(api_services)
) -> StackView:
    stack = await services.stacks.rename_stack(name, body.new_name)
    return await _shown(services, stack.name)


@router.post("/stacks/{name}/copy", response_model=StackView, status_code=201, tags=["stacks"])
async def copy_stack(
    name: str, body: CopyStack, services: Services = Depends(api_services)
) -> StackView:
    stack = await services.stacks.copy_stack(name, body.target)
    return await _shown(services, stack.name)


@router.post("/stacks/{name}/activate", response_model=StackView, tags=["stacks"])
async def activate_stack(name: str, services: Services = Depends(api_services)) -> StackView:
    """Make the stack the requesting user's active one (the server keeps serving its own)."""
    stack = await services.stacks.activate(name)
    return await _shown(services, stack.name)


@router.post("/stacks/{name}/share", response_model=StackView, tags=["stacks"])
async def share_stack(
    name: str, body: Share, services: Services = Depends(api_services)
) -> StackView:
    """Share a stack (and its components) with every user, or make it private again; only
    its owner or an admin may."""
    stack = await services.stacks.share_stack(name, body.shared)
    return await _shown(services, stack.name)


@router.delete("/stacks/{name}", status_code=204, tags=["stacks"])
async def delete_stack(
    name: str,
    dry_run: bool = Query(False, description="Only check that the rules let it be deleted"),
    services: Services = Depends(api_services),
) -> Response:
    """Delete a stack (never the default or the active one); its components stay. With
    ``dry_run``, the answer is the same (204, or the error why not) and nothing changes
    (clients from before ``GET /api/stacks/{name}?deletable=true`` ask so)."""
    if dry_run:
        await services.stacks.deletable(name)
    else:
        await services.stacks.delete_stack(name)
    return Response(status_code=204)


@router.get("/stacks/{name}/export", tags=["stacks"])
async def export_stack(name: str, services: Services = Depends(api_services)) -> dict[str, Any]:
    """The stack as data for ``POST /api/stacks/import``; secrets are always masked."""
    return await services.stacks.export_stack(name, include_secrets=False)


@router.get("/stacks/{name}/runs", response_model=Page[RunRecord], tags=["stacks"])
async def stack_runs(
    name: str,
    status: RunStatus | None = None,
    pipeline: str | None = None,
    paging: Paging = Depends(),
    services: Services = Depends(api_services),
) -> Page[RunRecord]:
    """The runs executed on this stack, newest first."""
    return await views.runs_page(services, paging, stack=name, status=status, pipeline=pipeline)


# --- components ---


@router.get("/components", response_model=Page[ComponentView], tags=["components"])
async def list_components(
    type: ComponentType | None = Query(None, description="Only components of this type"),
    flavor: str | None = Query(None, description="Only components of this flavor"),
    paging: Paging = Depends(),
    services: Services = Depends(api_services),
) -> Page[ComponentView]:
    found = await services.stacks.list_components(type)
    chosen = [c for c in found if flavor is None or c.flavor == flavor]
    return paging.slice(await views.component_views(services, chosen))


async def _component(services: Services, component: ComponentSpec) -> ComponentView:
    (shown,) = await views.component_views(services, [component])
    return shown


@router.post("/components", response_model=ComponentView, status_code=201, tags=["components"])
async def register_component(
    body: RegisterComponent, services: Services = Depends(api_services)
) -> ComponentView:
    """Register a component; its config is validated against its flavor."""
    component = await services.stacks.register_component(
        body.type, body.name, body.flavor, body.config, body.shared
    )
    return await _component(services, component)


@router.get("/components/{type}/{name}", response_model=ComponentView, tags=["components"])
async def get_component(
    type: ComponentType,
    name: str,
    deletable: bool = Query(
        False, description="Refuse (as a DELETE would: 409, 403) unless it may be deleted"
    ),
    services: Services = Depends(api_services),
) -> ComponentView:
    """A component. With ``deletable``, only if the rules let it be deleted: the CLI asks
    before its confirmation. A read, not a DELETE with a dry-run flag: a server from before
    the flag ignores it and only answers, where it would have deleted."""
    if deletable:
        component = await services.stacks.deletable_component(type, name)
    else:
        component = await services.stacks.get_component(type, name)
    return await _component(services, component)


@router.patch("/components/{type}/{name}", response_model=ComponentView, tags=["components"])
async def update_component(
    type: ComponentType,
    name: str,
    body: UpdateComponent,
    services: Services = Depends(api_services),
) -> ComponentView:
    """Set config keys (null removes a key); stacks that use it see the change."""
    component = await services.stacks.update_component(type, name, body.config)
    return await _component(services, component)


@router.post("/components/{type}/{name}/rename", response_model=ComponentView, tags=["components"])
async def rename_component(
    type: ComponentType, name: str, body: Rename, services: Services = Depends(api_services)
) -> ComponentView:
    component = await services.stacks.rename_component(type, name, body.new_name)
    return await _component(services, component)


@router.post("/components/{type}/{name}/share", response_model=ComponentView, tags=["components"])
async def share_component(
    type: ComponentType, name: str, body: Share, services: Services = Depends(api_services)
) -> ComponentView:
    """Share a component with every user, or make it private again."""
    component = await services.stacks.share_component(type, name, body.shared)
    return await _component(services, component)


@router.delete("/components/{type}/{name}", status_code=204, tags=["components"])
async def delete_component(
    type: ComponentType, name: str, services: Services = Depends(api_services)
) -> Response:
    """Delete a component that no stack uses (409 names the stacks that do)."""
    await services.stacks.delete_component(type, name)
    return Response(status_code=204)


# --- flavors ---


@router.get("/flavors", response_model=list[FlavorInfo], tags=["flavors"])
async def list_flavors(
    type: ComponentType | None = Query(None, description="Only flavors of this type"),
    services: Services = Depends(api_services),
) -> list[FlavorInfo]:
    return [flavor_info(f) for f in await services.stacks.list_flavors(type)]


@router.get("/flavors/{type}/{name}", response_model=FlavorInfo, tags=["flavors"])
async def get_flavor_info(type: ComponentType, name: str) -> FlavorInfo:
    return views.flavor_named(type, name)
