"""The stack export format: what ``stack export`` writes and ``stack import`` reads.

```yaml
format: 1
stack_name: shared
secrets: masked            # or: included
components:
  artifact_store: {name: nfs, flavor: local, configuration: {path: /mnt/artifacts}}
  orchestrator: {name: default, flavor: local, configuration: {}}
```

Only the keys a user set are exported, so an import picks up the flavor's current defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from conveyor.contracts import ComponentType, StackSpec, ValidationError
from conveyor.workers.flavors import exported_config

FORMAT: Literal[1] = 1
MAX_FILE_BYTES = 1024 * 1024
"""The largest stack file read: an export is a few kilobytes (and /dev/zero never ends)."""


class ExportedComponent(BaseModel):
    """One component of an exported stack."""

    model_config = ConfigDict(extra="forbid")

    name: str
    flavor: str
    configuration: dict[str, Any] = Field(default_factory=dict)


class StackExport(BaseModel):
    """A stack and its components, as a file a user can keep, edit and import elsewhere."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = FORMAT
    stack_name: str
    secrets: Literal["masked", "included"] = "masked"
    components: dict[ComponentType, ExportedComponent]


def export_data(stack: StackSpec, *, include_secrets: bool) -> dict[str, Any]:
    """The export of ``stack`` as plain data (YAML or JSON ready)."""
    export = StackExport(
        stack_name=stack.name,
        secrets="included" if include_secrets else "masked",
        components={
            t: ExportedComponent(
                name=c.name,
                flavor=c.flavor,
                configuration=exported_config(c, include_secrets=include_secrets),
            )
            for t, c in sorted(stack.components.items())
        },
    )
    return export.model_dump(mode="json")


def parse_export(data: Any) -> StackExport:
    """Read an export; a ValidationError says what in the file is wrong."""
    try:
        return StackExport.model_validate(data)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ValidationError(f"not a Conveyor stack export: {problems}") from None


def read_export_file(path: Path) -> Any:
    """The YAML data in the file ``path``; a one-line ValidationError when it cannot be read,
    is too large, is not text or not YAML. (The data is checked by :func:`parse_export`.)"""
    import yaml  # here: most commands that import this module read no file

    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ValidationError(
            f"cannot read {path}: larger than {MAX_FILE_BYTES // 1024} KiB (a stack export "
            "is a few KiB)"
        )
    try:
        return yaml.safe_load(raw.decode())
    except UnicodeDecodeError:
        raise ValidationError(
            f"cannot read {path}: not a text file (a stack export is YAML)"
        ) from None
    except yaml.YAMLError as exc:
        # PyYAML's own message spans lines and quotes the file; one line says enough.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ValidationError(f"cannot read {path}: not YAML: {problem}{where}") from None
