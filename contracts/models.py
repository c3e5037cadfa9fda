"""Records that the control plane stores and shows: stacks, components, runs, steps, artifacts."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from conveyor.contracts.enums import (
    ComponentType,
    Role,
    RunStatus,
    StepStatus,
)


class Frozen(BaseModel):
    """Base of every contract model: immutable and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=BaseModel)


def prevalidated(model: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """A ``model`` of ``values`` that its maker has checked already, built without
    validation: every field present, each of its declared type.

    For hot paths that make many models of parts checked once (the compiler's 100,000
    StepSpecs); pydantic's ``model_construct`` costs more than validating, as it fills
    defaults field by field. ``fields_set`` is shared, never changed. Anything from outside
    (a message, a request) is validated instead.
    """
    made = _new(model)
    _set(made, "__dict__", values)
    _set(made, "__pydantic_fields_set__", fields_set)
    _set(made, "__pydantic_extra__", None)
    _set(made, "__pydantic_private__", None)
    return made


_new = object.__new__  # a BaseModel has no __new__ of its own
_set = object.__setattr__  # a frozen model refuses its own __setattr__


class UserRecord(Frozen):
    """A user of a server; the token is never part of it (only its hash is stored)."""

    name: str
    role: Role
    created: datetime
    token_expires: datetime | None = None
    """When the user's token stops working (401); None: it works until rotated."""


MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 200
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
"""An identifier that arrives from outside (a run id, an event id): bounded."""
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
"""A name that arrives from outside (a step, a pool, a stack): bounded."""

DIGEST_PATTERN = r"^(blake3|sha256):[0-9a-f]{64}$"
"""A content digest: the algorithm, a colon, 64 hex digits (sha256 only in older records)."""
MAX_URI_LENGTH = 2048


class BlobRef(Frozen):
    """Bytes kept in an artifact store under their content address."""

    uri: str = Field(max_length=MAX_URI_LENGTH, description="Location inside the store")
    digest: str = Field(pattern=DIGEST_PATTERN, description="Digest of the bytes, checked on read")
    size: int = Field(ge=0, description="Size of the bytes")


class ArtifactRef(Frozen):
    """Where a persisted step output lives and how to read it back."""

    uri: str = Field(
        max_length=MAX_URI_LENGTH,
        description="Location inside the artifact store: file:///.../ab/abcd... or s3://b/p/ab/...",
    )
    digest: str = Field(
        pattern=DIGEST_PATTERN, description="Digest of the stored bytes; checked on every read"
    )
    size: int = Field(ge=0, description="Size of the stored bytes")
    materializer: str = Field(
        max_length=100, description="Name of the materializer that wrote the bytes"
    )
    data_type: str = Field(
        max_length=500, description="Qualified name of the Python type that was stored"
    )
    materializer_version: str | None = Field(
        default=None,
        max_length=50,
        description="Version of the materializer's format; None for artifacts written before "
        "versions were recorded",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_sha256(cls, data: Any) -> Any:
        # Records written before digests named their algorithm held a bare sha256.
        if isinstance(data, dict) and "sha256" in data and "digest" not in data:
            legacy = {k: v for k, v in data.items() if k != "sha256"}
            legacy["digest"] = f"sha256:{data['sha256']}"
            return legacy
        return data

    @classmethod
    def of(
        cls, blob: BlobRef, *, materializer: str, version: str | None, data_type: str
    ) -> ArtifactRef:
        """The reference of ``blob`` as written by version ``version`` of ``materializer``
        from a ``data_type``."""
        if (
            cls is ArtifactRef
            and len(materializer) <= 100
            and len(data_type) <= 500
            and (version is None or len(version) <= 50)
        ):
            # ``blob`` was validated; the names are this process's own, within their
            # bounds. A run keeps one reference per output (100,000 in a large fan-out):
            # built so, each shares one set of field names instead of holding its own
            # (that set is half of a validated reference's memory), and costs no validation.
            values = {
                "uri": blob.uri,
                "digest": blob.digest,
                "size": blob.size,
                "materializer": sys.intern(materializer),
                "data_type": sys.intern(data_type),
                "materializer_version": version,
            }
            return prevalidated(cls, values, _ARTIFACT_REF_FIELDS)
        return cls(
            uri=blob.uri,
            digest=blob.digest,
            size=blob.size,
            materializer=materializer,
            materializer_version=version,
            data_type=data_type,
        )


_ARTIFACT_REF_FIELDS = set(ArtifactRef.model_fields)


class ComponentSpec(Frozen):
    """One stack component: a flavor plus its validated configuration."""

    id: str
    type: ComponentType
    name: str
    flavor: str
    config: dict[str, Any] = Field(default_factory=dict)
    owner: str = "default"
    shared: bool = False
    created: datetime | None = None


class StackSpec(Frozen):
    """A named combination of components; every run records the stack it ran on."""

    id: str
    name: str
    components: dict[ComponentType, ComponentSpec]
    owner: str = "default"
    shared: bool = False
    created: datetime | None = None

    def component(self, type_: ComponentType) -> ComponentSpec:
        """The stack's component of ``type_`` (every stack has an orchestrator and a store)."""
        return self.components[type_]


class StepRecord(Frozen):
    """A step of a run as the metadata store holds it."""

    run_id: str
    name: str
    status: StepStatus
    attempt: int = 0
    max_retries: int = 0
    started: datetime | None = None
    finished: datetime | None = None
    duration_s: float | None = None
    error: str | None = None
    traceback: str | None = None
    pid: int | None = None
    worker: str | None = None
    upstream: list[str] = Field(default_factory=list)
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    logs: ArtifactRef | None = None
    retry_at: datetime | None = None
    """When a pending attempt that waits for its retry is due."""
    cached_from: str | None = None
    """For a ``cached`` step: the run that computed the outputs it reused."""


class RunRecord(Frozen):
    """A pipeline run and the stack it ran on (kept even if the stack changes later)."""

    id: str
    pipeline: str
    stack_id: str
    stack_name: str
    stack_snapshot: dict[str, Any] = Field(default_factory=dict)
    status: RunStatus
    parameters: dict[str, Any] = Field(default_factory=dict)
    created: datetime
    started: datetime | None = None
    finished: datetime | None = None
    error: str | None = None
    idempotency_key: str | None = None
    retry_of: str | None = None
    """The failed or cancelled run this run retries (``conveyor run retry``)."""
    retried_by: list[str] = Field(default_factory=list)
    """The runs that retry this one, oldest first."""
    user: str = "default"
    """Who submitted the run (``default``: the local user, and runs from before users)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish, or ``None`` while the run has not finished."""
        if self.started is None or self.finished is None:
            return None
        return (self.finished - self.started).total_seconds()


class ArtifactRecord(Frozen):
    """An output of a step of a run, as listed by ``conveyor artifact list``."""

    id: str
    run_id: str
    step_name: str
    output_name: str
    ref: ArtifactRef
    created: datetime
