"""The Conveyor release this process runs: stamped on every message it publishes, and named
when it cannot read a message of another release."""

from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, version

from conveyor.contracts import Identity, StepFailed, Unreadable, WorkerFacts
from conveyor.contracts.events import MAX_STEP_ERROR_LENGTH
from conveyor.workers.step_failures import keep_head

_LEADING_NUMBERS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})*")


@functools.cache
def conveyor_version() -> str:
    """The installed distribution's version ("0" in a checkout that was never installed)."""
    try:
        return version("conveyor")
    except PackageNotFoundError:
        return "0"


def release_key(version_text: str) -> tuple[int, ...] | None:
    """The leading numbers of a version ("1.10.2rc1" -> (1, 10, 2)), to tell which is older."""
    found = _LEADING_NUMBERS.match(version_text)
    return tuple(int(part) for part in found.group().split(".")) if found else None


def cannot_read(
    reader: str, what: str, sender: str, reason: str, sender_version: str | None
) -> str:
    """The error of a ``reader`` (this process) that cannot read ``what`` a ``sender`` sent it,
    for ``reason``: most likely the two run different releases, so it names both and which
    one to upgrade."""
    mine = conveyor_version()
    said = f"this {reader} cannot read the {what} ({reason})"
    if sender_version is None:
        return (
            f"{said}: the {sender} did not say its Conveyor release (older ones do not) and "
            f"this {reader} runs Conveyor {mine}; they are probably different releases: "
            f"upgrade the older of the two"
        )
    versions = f"the {sender} runs Conveyor {sender_version}, this {reader} Conveyor {mine}"
    theirs, ours = release_key(sender_version), release_key(mine)
    if theirs is None or ours is None or theirs == ours:
        return f"{said}: {versions}; upgrade the older of the two"
    if theirs > ours:
        return f"{said}: {versions}; upgrade this {reader} to Conveyor {sender_version}"
    return f"{said}: {versions}; upgrade the {sender} to Conveyor {mine}"


def attempt_refused(identity: Identity, error: str, by: WorkerFacts) -> StepFailed:
    """The failure of the attempt an unreadable message named (``identity`` has its step and
    attempt), for ``error``: not to be retried, as a reader of this release would refuse the
    same message again."""
    assert identity.step is not None and identity.attempt is not None
    return StepFailed(
        run_id=identity.run_id,
        step=identity.step,
        attempt=identity.attempt,
        error=keep_head(error, MAX_STEP_ERROR_LENGTH),
        retryable=False,
        by=by,
    )


def attempts_refused(identity: Identity, error: str, by: WorkerFacts) -> list[StepFailed]:
    """The failures of every attempt an unreadable message named, its own and those it
    carries (see :func:`attempt_refused`)."""
    own = [(identity.step, identity.attempt)] if identity.step and identity.attempt else []
    return [
        attempt_refused(
            Identity(type=identity.type, run_id=identity.run_id, step=step, attempt=attempt),
            error,
            by,
        )
        for step, attempt in [*own, *identity.carried]
    ]


def cancelled_run(message: Unreadable) -> str | None:
    """The run whose every attempt the unreadable control ``message`` stops, or None: only
    an ``AttemptsCancelled`` that says it cancels the whole run (the run was cancelled) is
    safe to act on unread; one that names attempts may stop some of a run that goes on."""
    who = message.identity
    return who.run_id if who.type == "AttemptsCancelled" and who.whole_run else None
