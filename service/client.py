"""``Client``: the synchronous Python API over a client's stacks, runs and artifacts.

The CLI is a thin layer over it. Each Client owns a private event loop; where one already
runs in the caller's thread (Jupyter, IPython), that loop runs in a thread of its own. An
asyncio service should rather use ``Services`` (or ``Conveyor``) directly: a Client blocks.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.contracts import (
    ArtifactRecord,
    ComponentSpec,
    ComponentType,
    NotFoundError,
    Role,
    RunRecord,
    RunStatus,
    StackSpec,
    StepRecord,
    UserRecord,
)
from conveyor.service.blocking import LoopThread
from conveyor.service.components import parse_type
from conveyor.service.context import Services
from conveyor.service.home import Home
from conveyor.service.login import read_login
from conveyor.workers.flavors import Flavor, run_artifact_store

if TYPE_CHECKING:
    # For typing only: importing either builds models a listing never uses (the Protocols
    # import every event).
    from conveyor.contracts import ArtifactStore, PipelineSpec
    from conveyor.service.handles import RunHandle

TypeName = ComponentType | str
Components = Mapping[ComponentType, str] | Mapping[str, str]

T = TypeVar("T")


class Client:
    """Stacks, runs and artifacts of one CONVEYOR_HOME. Close it, or use ``with``.

    This is the one place where local and client mode part: ``Client(home)`` is this class,
    over the home's own store, unless the home holds a login to a server (``conveyor
    login``); then it is a ``RemoteClient``, the same methods over the server's HTTP API
    (as ``pathlib.Path()`` is a ``PosixPath``). ``Client.local(home)`` is always local.
    """

    def __new__(cls, home: str | Path | Home | None = None) -> Client:
        if cls is Client and read_login(home if isinstance(home, Home) else Home.resolve(home)):
            # Imported here: httpx is for client mode only.
            from conveyor.service.remote_client import RemoteClient

            return super().__new__(RemoteClient)
        return super().__new__(cls)

    @staticmethod
    def local(home: str | Path | Home | None = None) -> Client:
        """A Client over the home's own store even if it is logged in to a server (for the
        server itself)."""
        return LocalClient(home)

    def __init__(self, home: str | Path | Home | None = None) -> None:
        self._home = home
        self._runner: asyncio.Runner | LoopThread | None = None
        self._services: Services | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store and the private loop; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            services, self._services = self._services, None
            if services is not None:
                runner.run(services.close())
            runner.close()

    def _run(self, call: Callable[[Services], Awaitable[T]]) -> T:
        if self._runner is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._runner = asyncio.Runner()
            else:  # Jupyter, IPython: the store's connection lives on a loop of its own
                self._runner = LoopThread()
        if self._services is None:
            self._services = self._runner.run(Services.open(self._home))
        services = self._services

        async def call_it() -> T:
            return await call(services)

        return self._runner.run(call_it())

    @property
    def home(self) -> Home:
        return self._run(_home_of)

    # --- stacks ---

    def list_stacks(self) -> list[StackSpec]:
        return self._run(lambda s: s.stacks.list_stacks())

    def get_stack(self, name: str | None = None) -> StackSpec:
        """The stack called ``name``, or the active stack."""
        return self._run(lambda s: s.stacks.resolve(name))

    def active_stack_name(self) -> str:
        return self._run(lambda s: s.stacks.active_name())

    def register_stack(
        self,
        name: str,
        components: Components,
        activate: bool = False,
        shared: bool = False,
    ) -> StackSpec:
        """A new stack of existing components: ``{"orchestrator": "o", "artifact_store": "a"}``;
        ``shared``: every user of the server may see and use it (and its components)."""
        chosen = _typed(components)
        return self._run(lambda s: s.stacks.register_stack(name, chosen, activate, shared))

    def share_stack(self, name: str, shared: bool = True) -> StackSpec:
        """Share a stack (and its components) with every user, or make it private again."""
        return self._run(lambda s: s.stacks.share_stack(name, shared))

    def activate_stack(self, name: str) -> StackSpec:
        """Make ``name`` the active stack of this client (``$CONVEYOR_STACK`` still wins)."""
        return self._run(lambda s: s.stacks.activate(name))

    def update_stack(self, name: str, components: Components) -> StackSpec:
        chosen = _typed(components)
        return self._run(lambda s: s.stacks.update_stack(name, chosen))

    def rename_stack(self, name: str, new_name: str) -> StackSpec:
        return self._run(lambda s: s.stacks.rename_stack(name, new_name))

    def copy_stack(self, source: str, target: str) -> StackSpec:
        return self._run(lambda s: s.stacks.copy_stack(source, target))

    def deletable_stack(self, name: str) -> StackSpec:
        """The stack ``name`` if it may be deleted; else the error that deleting it would raise."""
        return self._run(lambda s: s.stacks.deletable(name))

    def delete_stack(self, name: str) -> None:
        """Delete a stack (not its components); never the default or the active one."""
        self._run(lambda s: s.stacks.delete_stack(name))

    def export_stack(self, name: str, *, include_secrets: bool = False) -> dict[str, Any]:
        """The stack as data for a YAML file; secrets masked unless ``include_secrets``."""
        return self._run(lambda s: s.stacks.export_stack(name, include_secrets))

    def import_stack(self, data: Any, name: str | None = None) -> StackSpec:
        """Recreate an exported stack, creating the components that do not exist yet."""
        return self._run(lambda s: s.stacks.import_stack(data, name))

    # --- components ---

    def list_components(self, type_: TypeName | None = None) -> list[ComponentSpec]:
        chosen = parse_type(type_) if type_ is not None else None
        return self._run(lambda s: s.stacks.list_components(chosen))

    def get_component(self, type_: TypeName, name: str) -> ComponentSpec:
        return self._run(lambda s: s.stacks.get_component(parse_type(type_), name))

    def register_component(
        self,
        type_: TypeName,
        name: str,
        flavor: str,
        config: dict[str, Any] | None = None,
        shared: bool = False,
    ) -> ComponentSpec:
        """A new component; its config is validated against the flavor's config model."""
        return self._run(
            lambda s: s.stacks.register_component(parse_type(type_), name, flavor, config, shared)
        )

    def share_component(self, type_: TypeName, name: str, shared: bool = True) -> ComponentSpec:
        """Share a component with every user, or make it private again."""
        return self._run(lambda s: s.stacks.share_component(parse_type(type_), name, shared))

    def update_component(self, type_: TypeName, name: str, config: dict[str, Any]) -> ComponentSpec:
        """Set config keys of a component (a ``None`` value removes a key)."""
        return self._run(lambda s: s.stacks.update_component(parse_type(type_), name, config))

    def rename_component(self, type_: TypeName, name: str, new_name: str) -> ComponentSpec:
        return self._run(lambda s: s.stacks.rename_component(parse_type(type_), name, new_name))

    def deletable_component(self, type_: TypeName, name: str) -> ComponentSpec:
        """The component ``name`` if it may be deleted; else the error deleting it would raise."""
        return self._run(lambda s: s.stacks.deletable_component(parse_type(type_), name))

    def delete_component(self, type_: TypeName, name: str) -> None:
        """Delete a component that no stack uses."""
        self._run(lambda s: s.stacks.delete_component(parse_type(type_), name))

    def list_flavors(self, type_: TypeName | None = None) -> list[Flavor]:
        chosen = parse_type(type_) if type_ is not None else None
        return self._run(lambda s: s.stacks.list_flavors(chosen))

    # --- runs ---

    def list_runs(
        self,
        *,
        stack: str | None = None,
        pipeline: str | None = None,
        status: RunStatus | str | None = None,
        user: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        async def call(s: Services) -> list[RunRecord]:
            chosen = RunStatus(status) if status else None
            return await s.list_runs(
                stack=stack, pipeline=pipeline, status=chosen, user=user, limit=limit, offset=offset
            )

        return self._run(call)

    def get_run(self, run_id: str) -> RunRecord:
        return self._run(lambda s: s.runs.get_run(run_id))

    def get_spec(self, run_id: str) -> PipelineSpec:
        """The DAG a run ran (or runs), as it was compiled."""

        async def call(s: Services) -> PipelineSpec:
            return await s.runs.spec_of((await s.runs.get_run(run_id)).id)

        return self._run(call)

    def get_steps(self, run_id: str) -> list[StepRecord]:
        async def call(s: Services) -> list[StepRecord]:
            return await s.runs.steps_of((await s.runs.get_run(run_id)).id)

        return self._run(call)

    def get_logs(self, run_id: str, step: str | None = None) -> dict[str, str]:
        """What each step's last attempt printed and logged, by step name, in DAG order."""
        run = self.get_run(run_id)
        steps = [s for s in self.get_steps(run.id) if step is None or s.name == step]
        if step is not None and not steps:
            raise NotFoundError(f"run {run.id} has no step {step!r}")
        store = run_artifact_store(run.stack_snapshot)
        return {
            s.name: store.get_bytes(s.logs.uri, s.logs.digest).decode(errors="replace")
            for s in steps
            if s.logs is not None
        }

    def cancel_run(self, run_id: str, reason: str = "cancelled by user") -> RunRecord:
        """Ask the controller of the run's stack to cancel it; the run as recorded then.

        An embedded run can only be cancelled by the process that runs it (Ctrl+C on its
        ``conveyor pipeline run`` cancels it); the error says which process that is.
        """

        # Imported here, as load_artifact below: the engine and numpy are for runs and
        # values only, and every other call (the CLI's listings) starts faster without them.
        from conveyor.service.gateway import RunGateway

        async def call(s: Services) -> RunRecord:
            gateway = RunGateway(s.home)
            await gateway.start()
            try:
                return await gateway.cancel((await s.runs.get_run(run_id)).id, reason)
            finally:
                await gateway.stop()

        return self._run(call)

    def retry_run(self, run_id: str, *, raise_on_failure: bool = False) -> RunHandle:
        """Run a failed or cancelled run again, on its stack, and wait for the end: the same
        pipeline and parameters, compiled from the code as it is now; each step that
        completed there with the same code, parameters and inputs is reused (``cached``),
        the others run. The new run's ``retry_of`` names the old one. Raises ``RunFailed``
        if the retry fails too and ``raise_on_failure`` is set."""
        from conveyor.service.run_retries import retry

        async def call(s: Services) -> tuple[RunRecord, PipelineSpec]:
            run = await s.runs.get_run(run_id)
            return run, await s.runs.spec_of(run.id)

        run, spec = self._run(call)
        return retry(run, spec, raise_on_failure=raise_on_failure)

    def delete_run(self, run_id: str) -> None:
        self._run(lambda s: s.runs.delete_run(run_id))

    # --- users (of a server: on its own home, or through its API when logged in) ---

    def list_users(self) -> list[UserRecord]:
        return self._run(lambda s: s.users.list_users())

    def create_user(
        self, name: str, role: Role | str = Role.MEMBER, expires_in: str | None = None
    ) -> tuple[UserRecord, str]:
        """A new user and their token (with a lifetime: ``12h``, ``30d``, ``2w``); the token
        is never shown again."""
        return self._run(lambda s: s.users.create(name, Role(role), expires_in))

    def delete_user(self, name: str) -> None:
        """Delete a user; their stacks, components and runs stay (under their name)."""
        self._run(lambda s: s.users.delete(name))

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        """Make sure the admin, ``default``, exists (with ``token`` if given); the new token
        when one was made now (to be shown once), else None."""
        return self._run(lambda s: s.users.ensure_admin(token))

    def rotate_token(self, name: str, expires_in: str | None = None) -> tuple[UserRecord, str]:
        """A new token for ``name`` (with a lifetime if given); the old one gets 401 from
        then on."""
        return self._run(lambda s: s.users.rotate_token(name, expires_in))

    # --- artifacts ---

    def list_artifacts(
        self, *, run_id: str | None = None, limit: int = 100
    ) -> list[ArtifactRecord]:
        async def call(s: Services) -> list[ArtifactRecord]:
            full_id = (await s.runs.get_run(run_id)).id if run_id else None
            return await s.artifacts.list_artifacts(run_id=full_id, limit=limit)

        return self._run(call)

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        return self._run(lambda s: s.artifacts.get_artifact(artifact_id))

    def _store_of(self, artifact: ArtifactRecord) -> ArtifactStore:
        run = self.get_run(artifact.run_id)
        return run_artifact_store(run.stack_snapshot)

    def load_artifact(
        self, artifact_id: str, *, allow_pickle: bool = False, trust: Sequence[str] = ()
    ) -> Any:
        """The value of an artifact, read from the store of the stack its run ran on;
        ``trust`` names types a skops file may build beyond those skops trusts."""
        from conveyor.workers.execution import load_artifact

        artifact = self.get_artifact(artifact_id)
        return load_artifact(
            self._store_of(artifact), artifact.ref, allow_pickle=allow_pickle, trust=trust
        )

    def save_artifact_file(self, artifact_id: str, to: str | Path) -> int:
        """Copy an artifact's stored bytes, checked against their digest, to the file ``to``;
        returns the number of bytes. The bytes stream: an artifact may exceed memory."""
        artifact = self.get_artifact(artifact_id)
        self._store_of(artifact).get(
            artifact.ref.uri, artifact.ref.digest, lambda path: shutil.copyfile(path, to)
        )
        return artifact.ref.size


class LocalClient(Client):
    """A Client over its home's own store, whether or not the home is logged in."""


async def _home_of(services: Services) -> Home:
    return services.home


def _typed(components: Components) -> dict[ComponentType, str]:
    return {parse_type(t): name for t, name in components.items()}
