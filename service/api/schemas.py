"""Request and response bodies of the HTTP API that the contracts do not already define.

Responses are the contract models (``RunRecord``, ``StepRecord``, ``ArtifactRecord``) and the
views of ``service.public_records`` (stacks, components, flavors), always with
configurations masked: the same shapes as the CLI's ``--output json``.
"""

from __future__ import annotations

import math
from typing import Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from conveyor.contracts import ComponentType, PipelineSpec

T = TypeVar("T")

MAX_PAGE = 1000
MAX_OFFSET = 1_000_000_000
"""Past any list the store will hold; SQLite's integers end at 2**63."""


class Page(BaseModel, Generic[T]):
    """One page of a list; ``next_offset`` is ``null`` on the last page."""

    items: list[T]
    limit: int
    offset: int
    next_offset: int | None


class Paging:
    """The ``limit`` and ``offset`` query parameters of every list."""

    def __init__(
        self,
        limit: int = Query(50, ge=1, le=MAX_PAGE, description="At most this many items"),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Skip this many items"),
    ) -> None:
        self.limit = limit
        self.offset = offset

    def page(self, fetched: list[T]) -> Page[T]:
        """The page of ``fetched``, which holds up to ``limit + 1`` items from ``offset``."""
        more = len(fetched) > self.limit
        return Page(
            items=fetched[: self.limit],
            limit=self.limit,
            offset=self.offset,
            next_offset=self.offset + self.limit if more else None,
        )

    def slice(self, everything: list[T]) -> Page[T]:
        """The page of a list that was read whole (stacks, components: a few dozen)."""
        return self.page(everything[self.offset : self.offset + self.limit + 1])


def _non_finite(value: Any) -> str | None:
    """Where ``value`` holds Infinity or NaN (Python's JSON reads them; JSON has neither)."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where or "the body"
        if isinstance(item, dict):
            pending.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            pending.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        where = _non_finite(data)
        if where is not None:
            raise ValueError(f"{where} is Infinity or NaN, which JSON has no number for")
        return data


class SubmitRun(_Body):
    """Start a run: of a pipeline named by an importable reference (the server compiles it),
    or of a pipeline a client compiled (``spec``, its code uploaded with ``PUT /api/code``)."""

    pipeline: str | None = Field(
        default=None,
        min_length=1,
        description="'path/to/file.py:pipeline' under the server's pipelines folder "
        "(--pipelines), or 'package.module:pipeline' of a package it trusts (--trust)",
        examples=["examples/quickstart.py:training_pipeline"],
    )
    spec: PipelineSpec | None = Field(
        default=None,
        description="A compiled pipeline (instead of 'pipeline'): each step's code an archive "
        "uploaded to the stack's store, or a module of a package the server trusts",
    )
    parameters: dict[str, Any] = Field(default_factory=dict, examples=[{"epochs": 100}])
    stack: str | None = Field(default=None, description="Stack to run on (default: the server's)")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Same key, same run; the Idempotency-Key header does the same",
    )
    cache: StrictBool = Field(
        default=True,
        description="False: every step runs, none reuses an earlier run's outputs",
    )
    retry_of: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="With 'spec': the failed or cancelled run this one retries",
    )

    @model_validator(mode="after")
    def _one_pipeline(self) -> SubmitRun:
        if (self.pipeline is None) == (self.spec is None):
            raise ValueError("give either 'pipeline' (a reference) or 'spec' (compiled)")
        if self.spec is not None and self.parameters:
            raise ValueError("a compiled 'spec' carries its parameters; leave 'parameters' out")
        if self.retry_of is not None and self.spec is None:
            raise ValueError("'retry_of' goes with a 'spec' (POST /api/runs/{id}/retry else)")
        return self


class CancelRun(_Body):
    reason: str = Field(default="cancelled by user", max_length=500)


class RegisterComponent(_Body):
    type: ComponentType
    name: str
    flavor: str
    config: dict[str, Any] = Field(default_factory=dict)
    shared: bool = Field(default=False, description="Usable by every user, not only its owner")


class UpdateComponent(_Body):
    config: dict[str, Any] = Field(description="Keys to set; a null value removes a key")


class Rename(_Body):
    new_name: str


class RegisterStack(_Body):
    name: str
    components: dict[ComponentType, str] = Field(
        description="Component name by type", examples=[{"orchestrator": "default"}]
    )
    activate: bool = False
    shared: bool = Field(
        default=False, description="Usable by every user (with its components), not only its owner"
    )


class Share(_Body):
    shared: bool = Field(default=True, description="true: every user; false: its owner only")


class UserName(_Body):
    name: str = Field(min_length=1, max_length=100)
    admin: bool = False
    expires_in: str | None = Field(
        default=None, max_length=20, description="The token's lifetime: 12h, 30d, 2w (1h-366d)"
    )


class TokenLifetime(_Body):
    expires_in: str | None = Field(
        default=None, max_length=20, description="The new token's lifetime: 12h, 30d, 2w"
    )


class UpdateStack(_Body):
    components: dict[ComponentType, str]


class CopyStack(_Body):
    target: str


class ImportStack(_Body):
    data: dict[str, Any] = Field(description="What GET /api/stacks/{name}/export returned")
    name: str | None = None


class PreviewColumn(BaseModel):
    """One column of a previewed table."""

    name: str
    dtype: str
    index: bool = False


class PreviewTable(BaseModel):
    """A table's shape (rows, and columns besides the index), column types and first rows,
    each cell as text."""

    rows_total: int
    columns_total: int
    columns: list[PreviewColumn]
    rows: list[list[str]]


class PlotCell(BaseModel):
    """One rectangle of a heat map, in the plot's coordinates."""

    x: float
    y: float
    w: float
    h: float
    fill: str


class PreviewPlot(BaseModel):
    """A numeric array drawn as a line (1-D: SVG polyline points) or a heat map (2-D)."""

    kind: Literal["line", "heatmap"]
    shape: list[int]
    low: float
    high: float
    width: float
    height: float
    points: str | None = None
    cells: list[PlotCell] = []


class ArtifactPreview(BaseModel):
    """A human-readable look at an artifact's value."""

    artifact_id: str
    materializer: str
    data_type: str
    size: int
    kind: Literal["json", "text", "array", "table", "none"]
    text: str | None = None
    note: str | None = None
    table: PreviewTable | None = None
    plot: PreviewPlot | None = None


class HealthCheck(BaseModel):
    ok: bool
    detail: str


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    stack: str
    checks: dict[str, HealthCheck]
