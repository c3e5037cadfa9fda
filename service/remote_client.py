"""``RemoteClient``: the ``Client`` of a home logged in to a server, over its HTTP API.

Every method of ``Client`` is answered by the server, acting as the logged-in user; an
error answer becomes the same ``ConveyorError`` (same message) that the local store would
raise, so the CLI prints the same line. Nothing falls back to the home's own store: ``_run``
refuses, and a unit test checks that every public method is overridden here.
"""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from conveyor.contracts import (
    ArtifactRecord,
    ComponentSpec,
    ComponentType,
    ConflictError,
    ConveyorError,
    NotAllowed,
    NotFoundError,
    PipelineSpec,
    Role,
    RunRecord,
    RunStatus,
    StackSpec,
    StepRecord,
    UserRecord,
    ValidationError,
)
from conveyor.contracts.errors import shown
from conveyor.service.client import Client, Components, T, TypeName, _typed
from conveyor.service.components import parse_type
from conveyor.service.home import Home
from conveyor.service.login import Login, read_login
from conveyor.service.version import conveyor_version
from conveyor.workers.flavors import Flavor, flavors_of

if TYPE_CHECKING:
    from conveyor.service.handles import RunHandle

TIMEOUT_S = 30.0
PAGE = 200
"""Items asked for per page when the CLI lists everything."""
# What each HTTP error status means to a caller (the message is the server's own).
_ERRORS: dict[int, type[ConveyorError]] = {
    401: ConveyorError,
    403: NotAllowed,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
}


class ServerError(ConveyorError):
    """The server refused a request or could not be reached."""


def _refused(response: httpx.Response, login: Login) -> ConveyorError:
    if response.status_code == 401:
        # The server's message is for any HTTP client; this one says what to do here.
        return ConveyorError(
            f"{login.url} no longer takes the token this home logged in with, as "
            f"{login.user} (it is wrong, expired or rotated, or the user was deleted); "
            f"log in again with a new token: conveyor login {login.url} --token NEW_TOKEN"
        )
    try:
        message = str(response.json().get("message") or response.reason_phrase)
    except ValueError:
        message = response.text[:500] or response.reason_phrase
    cls = _ERRORS.get(response.status_code, ServerError)
    return cls(message, retryable=response.status_code in (502, 503, 504))


class RemoteClient(Client):
    """A Client whose every call goes to the server this home is logged in to."""

    def __init__(self, home: str | Path | Home | None = None) -> None:
        super().__init__(home)
        resolved = home if isinstance(home, Home) else Home.resolve(home)
        login = read_login(resolved)
        if login is None:
            raise ConveyorError(f"{resolved.path} is not logged in to a server")
        self.login: Login = login
        self._resolved = resolved
        self._http: httpx.Client | None = None

    # --- the connection ---

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.login.url,
                headers={
                    "Authorization": f"Bearer {self.login.token}",
                    "User-Agent": f"conveyor/{conveyor_version()}",
                },
                timeout=TIMEOUT_S,
                verify=tls_settings(),
            )
        return self._http

    def __enter__(self) -> RemoteClient:
        return self

    def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.close()

    def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        """One call to the API; a refusal raises the ConveyorError it stands for."""
        try:
            response = self._client().request(method, path, **options)
        except httpx.TransportError as exc:
            raise ServerError(
                f"this home is logged in to {self.login.url}, which does not answer "
                f"({type(exc).__name__}); is it up? (conveyor logout returns to this home's "
                "own store)",
                retryable=True,
            ) from None
        if response.status_code >= 400:
            raise _refused(response, self.login)
        return response

    def _json(self, method: str, path: str, **options: Any) -> Any:
        return self.request(method, path, **options).json()

    def _pages(self, path: str, params: dict[str, Any], limit: int | None = None) -> Iterator[Any]:
        offset = 0
        while limit is None or offset < limit:
            size = PAGE if limit is None else min(PAGE, limit - offset)
            page = self._json("GET", path, params={**params, "limit": size, "offset": offset})
            yield from page["items"]
            if page["next_offset"] is None:
                return
            offset = page["next_offset"]

    def _run(self, call: Any) -> Any:
        raise ConveyorError("a logged-in client never opens its home's own store")

    @property
    def home(self) -> Home:
        return self._resolved

    def me(self) -> dict[str, Any]:
        """The user, their active stack and the server's version (``conveyor status``)."""
        found: dict[str, Any] = self._json("GET", "/api/me")
        return found

    # --- stacks ---

    def list_stacks(self) -> list[StackSpec]:
        return [_stack(item) for item in self._pages("/api/stacks", {})]

    def get_stack(self, name: str | None = None) -> StackSpec:
        if name is not None:
            return _stack(self._json("GET", f"/api/stacks/{_path(name)}"))
        active = self.active_stack_name()
        try:
            return _stack(self._json("GET", f"/api/stacks/{_path(active)}"))
        except NotFoundError as exc:
            # A new member's active stack is 'default', the admin's, until it is shared.
            raise NotFoundError(
                f"{exc}: your active stack is not one you may use; conveyor stack list shows "
                "those you may, conveyor stack set NAME makes one active"
            ) from None

    def active_stack_name(self) -> str:
        return os.environ.get("CONVEYOR_STACK") or str(self.me()["active_stack"])

    def register_stack(
        self, name: str, components: Components, activate: bool = False, shared: bool = False
    ) -> StackSpec:
        body = {
            "name": name,
            "components": {t.value: c for t, c in _typed(components).items()},
            "activate": activate,
            "shared": shared,
        }
        return _stack(self._json("POST", "/api/stacks", json=body))

    def share_stack(self, name: str, shared: bool = True) -> StackSpec:
        return _stack(
            self._json("POST", f"/api/stacks/{_path(name)}/share", json={"shared": shared})
        )

    def activate_stack(self, name: str) -> StackSpec:
        return _stack(self._json("POST", f"/api/stacks/{_path(name)}/activate"))

    def update_stack(self, name: str, components: Components) -> StackSpec:
        chosen = {t.value: c for t, c in _typed(components).items()}
        return _stack(
            self._json("PATCH", f"/api/stacks/{_path(name)}", json={"components": chosen})
        )

    def rename_stack(self, name: str, new_name: str) -> StackSpec:
        body = {"new_name": new_name}
        return _stack(self._json("POST", f"/api/stacks/{_path(name)}/rename", json=body))

    def copy_stack(self, source: str, target: str) -> StackSpec:
        body = {"target": target}
        return _stack(self._json("POST", f"/api/stacks/{_path(source)}/copy", json=body))

    def deletable_stack(self, name: str) -> StackSpec:
        # Asked before a confirmation: what would be refused anyway is told first. A read,
        # not a DELETE with dry_run: a server from before that flag deleted at once.
        return _stack(self._json("GET", f"/api/stacks/{_path(name)}", params={"deletable": "true"}))

    def delete_stack(self, name: str) -> None:
        self.request("DELETE", f"/api/stacks/{_path(name)}")

    def export_stack(self, name: str, *, include_secrets: bool = False) -> dict[str, Any]:
        if include_secrets:
            raise ValidationError(
                "a server never sends secrets: export with --include-secrets on the server's "
                "own home"
            )
        found: dict[str, Any] = self._json("GET", f"/api/stacks/{_path(name)}/export")
        return found

    def import_stack(self, data: Any, name: str | None = None) -> StackSpec:
        return _stack(self._json("POST", "/api/stacks/import", json={"data": data, "name": name}))

    # --- components ---

    def list_components(self, type_: TypeName | None = None) -> list[ComponentSpec]:
        params = {"type": parse_type(type_).value} if type_ is not None else {}
        return [_component(item) for item in self._pages("/api/components", params)]

    def get_component(self, type_: TypeName, name: str) -> ComponentSpec:
        return _component(self._json("GET", _component_path(type_, name)))

    def register_component(
        self,
        type_: TypeName,
        name: str,
        flavor: str,
        config: dict[str, Any] | None = None,
        shared: bool = False,
    ) -> ComponentSpec:
        body = {
            "type": parse_type(type_).value,
            "name": name,
            "flavor": flavor,
            "config": config or {},
            "shared": shared,
        }
        return _component(self._json("POST", "/api/components", json=body))

    def share_component(self, type_: TypeName, name: str, shared: bool = True) -> ComponentSpec:
        path = _component_path(type_, name) + "/share"
        return _component(self._json("POST", path, json={"shared": shared}))

    def update_component(self, type_: TypeName, name: str, config: dict[str, Any]) -> ComponentSpec:
        return _component(
            self._json("PATCH", _component_path(type_, name), json={"config": config})
        )

    def rename_component(self, type_: TypeName, name: str, new_name: str) -> ComponentSpec:
        path = _component_path(type_, name) + "/rename"
        return _component(self._json("POST", path, json={"new_name": new_name}))

    def deletable_component(self, type_: TypeName, name: str) -> ComponentSpec:
        # Asked before a confirmation, as for a stack; a read, which a server from before
        # the check answers without it (the DELETE then refuses what it must).
        found = self._json("GET", _component_path(type_, name), params={"deletable": "true"})
        return _component(found)

    def delete_component(self, type_: TypeName, name: str) -> None:
        self.request("DELETE", _component_path(type_, name))

    def list_flavors(self, type_: TypeName | None = None) -> list[Flavor]:
        # Flavors are code, not records: a server of the same major version has these.
        types = [parse_type(type_)] if type_ is not None else list(ComponentType)
        return [f for t in types for f in flavors_of(t)]

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
        params = {"stack": stack, "pipeline": pipeline, "status": status, "user": user}
        chosen = {k: str(v) for k, v in params.items() if v is not None}
        found = self._pages("/api/runs", chosen, limit=offset + limit)
        return [_run_record(item) for item in found][offset:]

    def get_run(self, run_id: str) -> RunRecord:
        return _run_record(self._json("GET", f"/api/runs/{_path(run_id)}"))

    def get_steps(self, run_id: str) -> list[StepRecord]:
        found = self._json("GET", f"/api/runs/{_path(run_id)}/steps")
        return [StepRecord.model_validate(item) for item in found]

    def get_logs(self, run_id: str, step: str | None = None) -> dict[str, str]:
        params = {"step": step} if step is not None else {}
        found: dict[str, str] = self._json("GET", f"/api/runs/{_path(run_id)}/logs", params=params)
        return found

    def cancel_run(self, run_id: str, reason: str = "cancelled by user") -> RunRecord:
        found = self._json("POST", f"/api/runs/{_path(run_id)}/cancel", json={"reason": reason})
        return _run_record(found)

    def delete_run(self, run_id: str) -> None:
        self.request("DELETE", f"/api/runs/{_path(run_id)}")

    def get_spec(self, run_id: str) -> PipelineSpec:
        found = self._json("GET", f"/api/runs/{_path(run_id)}/spec")
        return PipelineSpec.model_validate(found)

    def retry_run(self, run_id: str, *, raise_on_failure: bool = False) -> RunHandle:
        """As ``Client.retry_run``: the pipeline is compiled again here (from the reference
        the run recorded, so from the folder it ran from) and run on the server."""
        from conveyor.service.run_retries import retry

        run = self.get_run(run_id)
        return retry(run, self.get_spec(run.id), raise_on_failure=raise_on_failure)

    # --- artifacts ---

    def list_artifacts(
        self, *, run_id: str | None = None, limit: int = 100
    ) -> list[ArtifactRecord]:
        params = {"run_id": run_id} if run_id else {}
        found = self._pages("/api/artifacts", params, limit=limit)
        return [ArtifactRecord.model_validate(item) for item in found]

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        found = self._json("GET", f"/api/artifacts/{_path(artifact_id)}")
        return ArtifactRecord.model_validate(found)

    def save_artifact_file(self, artifact_id: str, to: str | Path) -> int:
        """Stream the artifact's bytes (checked against their digest by the server, and
        here) into the file ``to``."""
        from conveyor.workers.digests import verify_file

        artifact = self.get_artifact(artifact_id)
        target = Path(to)
        staged = target.with_name(f".{target.name}.part")
        try:
            with self._client().stream(
                "GET", f"/api/artifacts/{_path(artifact.id)}/download"
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _refused(response, self.login)
                with staged.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            verify_file(str(staged), artifact.ref.digest, artifact.ref.uri)
            shutil.move(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        return artifact.ref.size

    def load_artifact(
        self, artifact_id: str, *, allow_pickle: bool = False, trust: Sequence[str] = ()
    ) -> Any:
        """The artifact's value: its bytes downloaded to a temporary file, then loaded by
        its materializer here (the server never unpickles or builds a value)."""
        from conveyor.workers.execution import load_artifact_file

        artifact = self.get_artifact(artifact_id)
        with tempfile.TemporaryDirectory(prefix="conveyor-artifact-") as folder:
            path = Path(folder) / "bytes"
            self.save_artifact_file(artifact.id, path)
            return load_artifact_file(path, artifact.ref, allow_pickle=allow_pickle, trust=trust)

    # --- users ---

    def list_users(self) -> list[UserRecord]:
        return [UserRecord.model_validate(u) for u in self._json("GET", "/api/users")]

    def create_user(
        self, name: str, role: Role | str = Role.MEMBER, expires_in: str | None = None
    ) -> tuple[UserRecord, str]:
        body = {"name": name, "admin": Role(role) is Role.ADMIN, "expires_in": expires_in}
        made = self._json("POST", "/api/users", json=body)
        return UserRecord.model_validate(made["user"]), str(made["token"])

    def delete_user(self, name: str) -> None:
        self.request("DELETE", f"/api/users/{_path(name)}")

    def rotate_token(self, name: str, expires_in: str | None = None) -> tuple[UserRecord, str]:
        path = f"/api/users/{_path(name)}/rotate-token"
        made = self._json("POST", path, json={"expires_in": expires_in})
        return UserRecord.model_validate(made["user"]), str(made["token"])

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        raise ConveyorError("the admin is made by 'conveyor server up' on the server's home")


def tls_settings() -> ssl.SSLContext:
    """The process's TLS settings for a server (made once for the environment's CA files)."""
    return _tls(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """httpx's TLS settings (which read $SSL_CERT_FILE and $SSL_CERT_DIR, hence the key),
    made once per process: loading the CA bundle takes some 60 ms, per Client otherwise."""
    return httpx.create_ssl_context()


def _path(part: str) -> str:
    """A name or id as one path segment: '/', '%', '..' cannot reach another route."""
    if not part or part in (".", ".."):
        raise ValidationError(f"invalid name or id {shown(part)}")
    return quote(part, safe="")


def _component_path(type_: TypeName, name: str) -> str:
    return f"/api/components/{parse_type(type_).value}/{_path(name)}"


def _run_record(item: dict[str, Any]) -> RunRecord:
    # ``duration_s`` is computed from started and finished, not a field to set.
    return RunRecord.model_validate({k: v for k, v in item.items() if k != "duration_s"})


def _stack(item: dict[str, Any]) -> StackSpec:
    data = {k: v for k, v in item.items() if k != "active"}
    return StackSpec.model_validate(data)


def _component(item: dict[str, Any]) -> ComponentSpec:
    data = {k: v for k, v in item.items() if k not in ("active", "stacks")}
    return ComponentSpec.model_validate(data)


__all__ = ["RemoteClient", "ServerError", "T"]
