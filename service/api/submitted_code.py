"""Code a client uploads and the compiled pipelines it submits, checked before anything runs.

A client logged in to a server compiles its pipeline itself, uploads the code archives of its
steps (``PUT /api/code/{digest}``) and submits the compiled ``PipelineSpec``. The server never
imports either: an archive is bytes whose digest, size and zip entries are checked before it
goes into the stack's artifact store, and a spec is data whose every step must name an archive
that the store holds or a module of a package the server trusts. Workers check again (they
run only ``@step`` functions of the run's archive or of packages they trust).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from conveyor.contracts import (
    BlobRef,
    ComponentType,
    ConveyorError,
    PipelineSpec,
    StackSpec,
    UntrustedStep,
    ValidationError,
)
from conveyor.contracts.models import DIGEST_PATTERN
from conveyor.contracts.protocols import ArtifactStore
from conveyor.service.api.errors import Forbidden
from conveyor.service.pipelines import PipelineTooLarge
from conveyor.workers import digests
from conveyor.workers.code_cache import check_archive
from conveyor.workers.flavors import orchestrator_config
from conveyor.workers.step_resolver import parse_reference

DEFAULT_MAX_CODE_BYTES = 50 << 20
"""The largest code archive a server takes, unless ``conveyor server up --max-code-mb`` says."""
MAX_CODE_BYTES_CEILING = 1 << 30
"""No server takes a larger code archive, whatever ``--max-code-mb`` says."""
MAX_SPEC_BODY_BYTES = 16 << 20
"""The largest body of ``POST /api/runs``: a compiled pipeline of many steps is long."""
REMEMBERED_ARCHIVES = 10_000
"""Archives the server remembers having checked, per process (then it looks in the store)."""
_DIGEST = re.compile(DIGEST_PATTERN)
_BUFFER = 1 << 20


class CodeTooLarge(PipelineTooLarge):
    """A code archive over the server's bound (HTTP 413)."""


@dataclass
class CheckedArchives:
    """Archives known to be in a stack's store: uploaded here or found there once."""

    limit: int = REMEMBERED_ARCHIVES
    _known: OrderedDict[tuple[str, str], BlobRef] = field(default_factory=OrderedDict)

    def get(self, stack_id: str, digest: str) -> BlobRef | None:
        return self._known.get((stack_id, digest))

    def add(self, stack_id: str, blob: BlobRef) -> None:
        self._known[(stack_id, blob.digest)] = blob
        self._known.move_to_end((stack_id, blob.digest))
        while len(self._known) > self.limit:
            self._known.popitem(last=False)


def checked_digest(digest: str) -> str:
    """The digest an upload is named by: blake3, as every archive a client packs."""
    if not _DIGEST.fullmatch(digest) or not digest.startswith(f"{digests.ALGORITHM}:"):
        raise ValidationError(
            f"{digest[:100]!r} is not a content digest: {digests.ALGORITHM}:<64 hex digits>"
        )
    return digest


async def _spool(chunks: AsyncIterator[bytes], path: str, limit: int) -> int:
    """Write the body to ``path``, off the loop a megabyte at a time; its size."""
    size = 0
    pending: list[bytes] = []
    buffered = 0
    with open(path, "wb") as out:  # noqa: ASYNC230 (opened empty; writes go to a thread)
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise CodeTooLarge(
                    f"the code archive is larger than this server's bound of {limit} bytes "
                    "(conveyor server up --max-code-mb); ship less code ([tool.conveyor.code] "
                    "exclude in pyproject.toml)"
                )
            pending.append(chunk)
            buffered += len(chunk)
            if buffered >= _BUFFER:
                await asyncio.to_thread(out.writelines, pending)
                pending, buffered = [], 0
        await asyncio.to_thread(out.writelines, pending)
    return size


def _store_archive(path: str, digest: str, store: ArtifactStore) -> BlobRef:
    """Check the spooled archive and put it into ``store``; blocking."""
    actual, _ = digests.of_file(path, digests.split(digest)[0])
    if actual != digest:
        raise ValidationError(
            f"the body's digest is {actual}, not the {digest} the request names: the upload "
            "was cut or changed on the way"
        )
    try:
        check_archive(path)
    except UntrustedStep as exc:
        raise ValidationError(str(exc)) from None
    except ConveyorError as exc:  # not a zip
        raise ValidationError(str(exc)) from None

    def write(target: str) -> str:
        shutil.copyfile(path, target)
        return digest

    return store.put(write)


async def receive_archive(
    chunks: AsyncIterator[bytes], digest: str, store: ArtifactStore, limit: int
) -> BlobRef:
    """The uploaded archive ``digest``, checked and stored; its place in ``store``."""
    handle, path = tempfile.mkstemp(prefix="conveyor-upload-", suffix=".zip")
    os.close(handle)
    try:
        await _spool(chunks, path, limit)
        return await asyncio.to_thread(_store_archive, path, digest, store)
    finally:
        os.unlink(path)


def trusted_packages(stack: StackSpec, server_trusts: Iterable[str]) -> frozenset[str]:
    """Packages a step may come from without an archive: the server's ``--trust`` and the
    stack's orchestrator's ``trusted_packages`` (which its workers trust)."""
    config = orchestrator_config(stack)
    return frozenset(server_trusts) | frozenset(getattr(config, "trusted_packages", ()))


def _found_in(store: ArtifactStore, code: BlobRef) -> bool:
    try:
        store.get(code.uri, code.digest, lambda path: None)
    except ConveyorError:
        return False
    return True


async def check_spec(
    spec: PipelineSpec,
    *,
    stack: StackSpec,
    store: ArtifactStore,
    archives: CheckedArchives,
    trusted: frozenset[str],
    max_steps: int,
) -> None:
    """Refuse a submitted spec that names code the stack's workers would not run: a step
    without an archive outside the trusted packages (403), an archive the store lacks (422),
    more than ``max_steps`` steps (413). Nothing is imported."""
    if len(spec.steps) > max_steps:
        raise PipelineTooLarge(
            f"pipeline {spec.name!r} has {len(spec.steps)} steps; this server runs at most "
            f"{max_steps} (conveyor server up --max-steps)"
        )
    looked: dict[str, bool] = {}
    for step in spec.steps:
        try:
            ref = parse_reference(step.ref)
        except UntrustedStep as exc:
            raise ValidationError(f"step {step.name!r}: {exc}") from None
        if step.code is None:
            if ref.is_file or ref.top not in trusted:
                shown = ", ".join(sorted(trusted)) or "none"
                raise Forbidden(
                    f"step {step.name!r} ({step.ref}) ships no code archive and is not of a "
                    f"package this server trusts (trusted on stack {stack.name!r}: {shown}); "
                    "submit it with its code (conveyor pipeline run uploads it)"
                )
            continue
        known = archives.get(stack.id, step.code.digest)
        if known == step.code:
            continue
        if step.code.digest not in looked:
            looked[step.code.digest] = await asyncio.to_thread(_found_in, store, step.code)
        if not looked[step.code.digest]:
            raise ValidationError(
                f"step {step.name!r} names the code archive {step.code.digest}, which stack "
                f"{stack.name!r}'s artifact store does not hold at {step.code.uri!r}: upload "
                "it first (PUT /api/code/{digest}?stack=...)"
            )
        archives.add(stack.id, step.code)


def runs_in_the_server(stack: StackSpec) -> bool:
    """Whether ``stack``'s steps would run inside the server's own process (embedded)."""
    from conveyor.workers.flavors import get_flavor

    orchestrator = stack.component(ComponentType.ORCHESTRATOR)
    return get_flavor(orchestrator.type, orchestrator.flavor).embedded


def stacks_for_code(stacks: Iterable[StackSpec], admin: bool) -> list[str]:
    """Which of ``stacks`` run code a client uploads: every one for an admin, those whose
    workers run outside the server for a member."""
    return [s.name for s in stacks if admin or not runs_in_the_server(s)]
