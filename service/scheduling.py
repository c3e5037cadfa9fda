"""The run state machine: pure functions from (run state, event) to what changed.

No I/O here. The controller keeps a :class:`RunState` per active run, calls these
functions, persists the returned :class:`Transition` and publishes its events.

A run whose ``defer`` is set does not dispatch a step the moment its inputs exist: the step
is listed in ``Transition.ready`` and the controller decides, after looking for its cache
key, whether to complete it from an earlier run's outputs (:func:`complete_from_cache`) or
to dispatch it (:func:`dispatch_ready`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta

from conveyor.contracts import (
    FINISHED_STEP_STATUSES,
    ArtifactRef,
    AttemptsCancelled,
    Event,
    RunFinished,
    RunStatus,
    StepFailed,
    StepHeartbeat,
    StepReady,
    StepSpec,
    StepStarted,
    StepStatus,
    StepStatusChanged,
    StepSucceeded,
)
from conveyor.contracts.events import MAX_RIDERS, Rider, trusted
from conveyor.contracts.models import prevalidated
from conveyor.service.cache_keys import cache_key
from conveyor.service.retry_delay import retry_delay
from conveyor.service.run_state import (
    RunState,
    StepUpdate,
    Transition,
    is_ready,
)


def _status_event(run: RunState, update: StepUpdate) -> StepStatusChanged:
    # Made of a step update this module built from checked parts: not validated again.
    return trusted(
        StepStatusChanged,
        run_id=run.run_id,
        step=update.name,
        status=update.status,
        attempt=update.attempt,
        error=update.error,
        duration_s=update.duration_s,
        outputs=update.outputs,
        retry_at=update.retry_at,
        cached_from=update.cached_from,
    )


def _record(run: RunState, out: Transition, update: StepUpdate) -> None:
    state = run.steps[update.name]
    run.set_status(update.name, update.status)
    state.attempt = update.attempt
    state.retry_at = update.retry_at
    if update.worker is not None:
        state.worker = update.worker
    if update.outputs:
        state.outputs = update.outputs
    if update.status in FINISHED_STEP_STATUSES:
        # Stored with the step; in memory only a step that may still run needs it.
        state.cache_key = None
    elif update.cache_key is not None:
        state.cache_key = update.cache_key
    out.steps.append(update)
    out.emit.append(_status_event(run, update))


def inputs_of(run: RunState, spec: StepSpec) -> dict[str, ArtifactRef | list[ArtifactRef]]:
    """The artifacts a step of ``run`` reads, by input name (its upstream steps succeeded)."""
    values: dict[str, ArtifactRef | list[ArtifactRef]] = {}
    for name, binding in spec.inputs.items():
        if isinstance(binding, list):
            values[name] = [run.steps[b.step].outputs[b.output] for b in binding]
        else:
            values[name] = run.steps[binding.step].outputs[binding.output]
    return values


def _dispatch(
    run: RunState, out: Transition, name: str, attempt: int, update: StepUpdate | None = None
) -> None:
    """Publish a StepReady for ``attempt``; the stored row records the attempt dispatched
    (with the step's cache key, so that a later run finds its outputs)."""
    state = run.steps[name]
    if state.attempt == 0 and state.status not in FINISHED_STEP_STATUSES:
        run.dispatched += 1
    state.attempt = attempt
    state.lease_until = None
    state.retry_at = None
    run.set_status(name, StepStatus.PENDING)
    out.steps.append(
        update or StepUpdate(name, StepStatus.PENDING, attempt, cache_key=state.cache_key)
    )
    out.emit.append(
        trusted(  # a checked spec, stored refs and our own attempt count: not validated again
            StepReady,
            run_id=run.run_id,
            step=_for_workers(state.spec),
            attempt=attempt,
            inputs=inputs_of(run, state.spec),
            then=_riders(run, out, name),
        )
    )


def _rider(run: RunState, parent: str) -> str | None:
    """The step that may ride on ``parent``'s StepReady: its only child, reading only its
    outputs, still to run and never reused (the cache off, not a retried run's step)."""
    children = run.downstream.get(parent, ())
    if len(children) != 1:
        return None
    child = children[0]
    state = run.steps[child]
    if (
        state.spec.cache
        or child in run.previous
        or state.status is not StepStatus.PENDING
        or not _reads_only(state.spec, parent)
    ):
        return None
    return child


def _reads_only(spec: StepSpec, parent: str) -> bool:
    """Whether ``spec`` reads outputs of ``parent`` and of no other step. It stops at the
    first other step: each of a fan-in's thousand branches asks it about the join."""
    for binding in spec.inputs.values():
        for selector in binding if isinstance(binding, list) else (binding,):
            if selector.step != parent:
                return False
    return bool(spec.inputs)


def _riders(run: RunState, out: Transition, name: str) -> list[Rider]:
    """Dispatch the chain that follows ``name`` (up to MAX_RIDERS steps) to ride on its
    StepReady. A step that rode on an earlier attempt of ``name`` (which failed, or was
    lost) rides again with the same attempt: it never ran, and whatever an old execution
    of ``name`` forwarded is told apart by what it read (``rode_on``), not by its number."""
    riders: list[Rider] = []
    parent = name
    while len(riders) < MAX_RIDERS:
        child = _rider(run, parent)
        if child is None:
            break
        state = run.steps[child]
        if state.attempt == 0:
            if run.dispatched >= run.max_dispatched:
                break
            run.dispatched += 1
            state.attempt = 1
            out.steps.append(StepUpdate(child, StepStatus.PENDING, 1))
        # A checked spec and our own attempt count: not validated again.
        values = {"step": _for_workers(state.spec), "attempt": state.attempt}
        riders.append(prevalidated(Rider, values, {"step", "attempt"}))
        parent = child
    return riders


def early(run: RunState, event: Event) -> bool:
    """Whether ``event`` is of the current attempt of a step that rode, heard before the
    outcome of the step before it. Its worker published that outcome first, so this
    happens only when the controller handed a batch back and took later deliveries
    meanwhile, or for a stale forward. It is not applied: the controller holds an outcome
    until that one is recorded (only then can it tell whether the step read the recorded
    outputs), and drops a StepStarted or heartbeat (the next one, or the outcome, says as
    much)."""
    if not isinstance(event, StepStarted | StepHeartbeat | StepSucceeded | StepFailed):
        return False
    return bool(run.waiting.get(event.step)) and _is_current(run, event.step, event.attempt)


def _for_workers(spec: StepSpec) -> StepSpec:
    """``spec`` without what only the controller reads (its code digest and cache flag),
    so that a worker from before caching takes the step."""
    if spec.code_digest is None and spec.cache:
        return spec
    # A copy of a checked spec with two fields at their defaults: nothing to validate
    # again (``model_copy`` costs twice as much, and every dispatched step is copied).
    values = {**spec.__dict__, "code_digest": None, "cache": True}
    return prevalidated(StepSpec, values, spec.model_fields_set | _WORKER_FIELDS)


_WORKER_FIELDS = frozenset({"code_digest", "cache"})


def _top_up(run: RunState, out: Transition) -> None:
    """Dispatch ready steps, in the order they became ready, while there is room. In a
    deferring run, a step the controller has not decided about goes to ``out.ready``
    instead (it takes no room: it may be reused); a miss comes back through
    :func:`dispatch_ready` and waits for room like any other."""
    while run.ready and run.dispatched < run.max_dispatched:
        name = run.ready.popleft()
        if not is_ready(run, name):  # cancelled, reused or dispatched meanwhile
            continue
        if run.defer and not run.steps[name].decided:
            out.ready.append(name)
            continue
        _dispatch(run, out, name, 1)


def top_up(run: RunState) -> Transition:
    """Dispatch the ready steps that ``run`` has room for (after it was loaded)."""
    out = Transition()
    if run.status is RunStatus.RUNNING:
        _top_up(run, out)
    return out


def _finish_if_done(run: RunState, out: Transition) -> None:
    if run.unfinished:
        return
    failed = [s for s in run.steps.values() if s.status is StepStatus.FAILED]
    run.status = RunStatus.FAILED if failed else RunStatus.COMPLETED
    run.error = f"step {failed[0].spec.name!r} failed" if failed else None
    out.run_status, out.run_error = run.status, run.error
    out.emit.append(RunFinished(run_id=run.run_id, status=run.status, error=run.error))


def _deciding(run: RunState, name: str) -> bool:
    """Whether ``name`` waits for the controller's decision (see ``Transition.ready``)."""
    return run.status is RunStatus.RUNNING and name in run.steps and is_ready(run, name)


def undecided(run: RunState) -> list[str]:
    """The steps that wait for the controller's decision (after it reloaded the run)."""
    return [name for name in run.steps if _deciding(run, name)] if run.defer else []


def dispatch_ready(run: RunState, name: str, key: str | None) -> Transition:
    """Dispatch a step the controller found no reusable outputs for, when its run has room
    (else it waits for room); ``key`` is recorded with it, so that a later run finds its
    outputs."""
    out = Transition()
    if not _deciding(run, name):
        return out
    state = run.steps[name]
    state.cache_key, state.decided = key, True
    run.ready.append(name)
    _top_up(run, out)
    return out


def complete_from_cache(
    run: RunState,
    name: str,
    outputs: dict[str, ArtifactRef],
    source: str,
    key: str | None,
    now: datetime,
) -> Transition:
    """Record a step ``cached``: its outputs are those that run ``source`` computed. Its
    downstream steps become ready, as after a success."""
    out = Transition()
    if not _deciding(run, name) or set(outputs) != set(run.steps[name].spec.outputs):
        return out
    update = StepUpdate(
        name,
        StepStatus.CACHED,
        0,
        started=now,
        finished=now,
        duration_s=0.0,
        outputs=outputs,
        cache_key=key,
        cached_from=source,
    )
    _record(run, out, update)
    run.ready.extend(child for child in run.downstream.get(name, ()) if is_ready(run, child))
    _top_up(run, out)
    _finish_if_done(run, out)
    return out


def start_run(run: RunState, now: datetime) -> Transition:
    """Mark the run running and dispatch every step without upstream steps."""
    out = Transition(run_status=RunStatus.RUNNING)
    run.status = RunStatus.RUNNING
    _top_up(run, out)
    _finish_if_done(run, out)  # an empty pipeline completes at once
    return out


def _skip_downstream(run: RunState, out: Transition, name: str, now: datetime) -> None:
    stack = list(run.downstream.get(name, ()))
    while stack:
        child = stack.pop()
        if run.steps[child].status in FINISHED_STEP_STATUSES:
            continue
        _record(
            run,
            out,
            StepUpdate(
                child,
                StepStatus.SKIPPED,
                run.steps[child].attempt,
                finished=now,
                error=f"skipped: upstream step {name!r} failed",
            ),
        )
        stack.extend(run.downstream.get(child, ()))


def _is_current(run: RunState, step: str, attempt: int) -> bool:
    state = run.steps.get(step)
    return (
        state is not None
        and state.attempt == attempt
        and state.status in (StepStatus.PENDING, StepStatus.RUNNING)
    )


def apply_event(
    run: RunState,
    event: Event,
    *,
    now: datetime | None = None,
    draw: Callable[[], float] = random.random,
) -> Transition:
    """Apply a worker's event to ``run`` (mutated in place) and say what changed.

    Events for another attempt than the current one, or for a step that already finished,
    change nothing: that is what makes duplicate and stale deliveries harmless. A retry
    that waits is due ``now`` (the event's time if not given) plus its delay; ``draw``
    gives the random number of its jitter.
    """
    out = Transition()
    if run.status is not RunStatus.RUNNING or early(run, event):
        return out
    if isinstance(event, StepStarted | StepHeartbeat):
        # A heartbeat also says the attempt started, should its StepStarted come later.
        current = _is_current(run, event.step, event.attempt)
        if current and (
            isinstance(event, StepStarted) or run.steps[event.step].status is StepStatus.PENDING
        ):
            _record(
                run,
                out,
                StepUpdate(
                    event.step,
                    StepStatus.RUNNING,
                    event.attempt,
                    started=event.time,
                    pid=event.by.pid,
                    worker=event.by.worker,
                ),
            )
    elif isinstance(event, StepSucceeded | StepFailed) and _is_current(
        run, event.step, event.attempt
    ):
        if event.rode_on and not _read_as_recorded(run, event):
            _ride_again(run, out, event)
        elif isinstance(event, StepSucceeded):
            _on_success(run, out, event)
        else:
            _on_failure(run, out, event, now or event.time, draw())
    return out


def _read_as_recorded(run: RunState, event: StepSucceeded | StepFailed) -> bool:
    """Whether a step that rode read the outputs recorded for the step before it. Another
    execution of that one (delivered again, its worker killed after it forwarded) may have
    forwarded it other outputs. ``rode_on`` on a step that cannot ride says nothing."""
    upstream = run.steps[event.step].spec.upstream
    if len(upstream) != 1:
        return True
    outputs = run.steps[upstream[0]].outputs
    return all(
        name in outputs and outputs[name].digest == digest for name, digest in event.rode_on.items()
    )


def _ride_again(run: RunState, out: Transition, event: StepSucceeded | StepFailed) -> None:
    """An outcome of a step that read another execution's outputs than those recorded:
    not taken. The step runs again, dispatched by the controller with the recorded ones
    (a new attempt); the other copies of this attempt are told to stop."""
    name, attempt, state = event.step, event.attempt, run.steps[event.step]
    state.redone += 1
    error = f"attempt {attempt} read outputs of {state.spec.upstream[0]!r} that "
    error += "were not the recorded ones; running it again"
    stop = AttemptsCancelled(run_id=run.run_id, attempts={name: attempt}, reason=error)
    out.emit.append(stop)
    update = StepUpdate(name, StepStatus.PENDING, attempt + 1, error=error, redone=state.redone)
    out.emit.append(_status_event(run, update))
    _dispatch(run, out, name, update.attempt, update)


def _on_success(run: RunState, out: Transition, event: StepSucceeded) -> None:
    _record(
        run,
        out,
        StepUpdate(
            event.step,
            StepStatus.COMPLETED,
            event.attempt,
            started=_unannounced_start(run, event),
            finished=event.time,
            duration_s=event.duration_s,
            pid=event.by.pid,
            worker=event.by.worker,
            outputs=event.outputs,
            logs=event.logs,
        ),
    )
    for child in run.downstream.get(event.step, ()):
        if is_ready(run, child):
            run.ready.append(child)
            continue
        state = run.steps[child]
        if state.attempt and state.status in _GOING and state.cache_key is None:
            # It rode on this step (nothing else dispatches a step before its upstream
            # succeeded): its cache key is known now, and recorded so that a later run
            # finds its outputs, as with a step the controller dispatched.
            state.cache_key = cache_key(state.spec, inputs_of(run, state.spec))
            if state.cache_key is not None:
                update = StepUpdate(child, state.status, state.attempt, cache_key=state.cache_key)
                out.steps.append(update)
    _top_up(run, out)
    _finish_if_done(run, out)


_GOING = (StepStatus.PENDING, StepStatus.RUNNING)


def _unannounced_start(run: RunState, event: StepSucceeded | StepFailed) -> datetime | None:
    """When a worker did not announce a short step, its start is its end minus its duration."""
    if run.steps[event.step].status is not StepStatus.PENDING:
        return None
    return event.time - timedelta(seconds=event.duration_s)


def _on_failure(
    run: RunState, out: Transition, event: StepFailed, now: datetime, draw: float
) -> None:
    state = run.steps[event.step]
    # Attempts lost with their worker, or run again on the recorded inputs, are not the
    # step's own: they use none of its retries.
    failures = event.attempt - state.lost - state.redone
    retry = event.retryable and failures <= state.spec.retries
    update = StepUpdate(
        event.step,
        StepStatus.PENDING if retry else StepStatus.FAILED,
        event.attempt + 1 if retry else event.attempt,
        started=_unannounced_start(run, event),
        finished=None if retry else event.time,
        duration_s=event.duration_s,
        error=event.error,
        traceback=event.traceback,
        pid=event.by.pid,
        worker=event.by.worker,
        logs=event.logs,
    )
    delay = 0.0
    if retry:
        delay = retry_delay(state.spec.retry, failures, asked_s=event.retry_after_s, draw=draw)
        update.retry_at = now + timedelta(seconds=delay) if delay > 0 else None
    out.emit.append(_status_event(run, update))
    if retry:
        if delay <= 0:
            _dispatch(run, out, event.step, update.attempt, update)
            return
        # No StepReady yet: the controller dispatches the attempt when it is due.
        state.attempt, state.retry_at, state.lease_until = update.attempt, update.retry_at, None
        run.set_status(event.step, StepStatus.PENDING)
        out.steps.append(update)
        return
    run.set_status(event.step, StepStatus.FAILED)
    out.steps.append(update)
    _skip_downstream(run, out, event.step, event.time)
    _top_up(run, out)
    _finish_if_done(run, out)


def cancel_run(run: RunState, now: datetime, reason: str) -> Transition:
    """Cancel every unfinished step and the run; late events are ignored afterwards, and
    the workers hear that the run's attempts are to stop where they run."""
    out = Transition()
    if run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
        return out
    out.emit.append(AttemptsCancelled(run_id=run.run_id, reason=reason))
    for name, state in run.steps.items():
        if state.status not in FINISHED_STEP_STATUSES:
            _record(
                run,
                out,
                StepUpdate(name, StepStatus.CANCELLED, state.attempt, finished=now, error=reason),
            )
    run.status, run.error = RunStatus.CANCELLED, reason
    out.run_status, out.run_error = run.status, reason
    out.emit.append(RunFinished(run_id=run.run_id, status=run.status, error=reason))
    return out


def dispatch_due_retries(run: RunState, now: datetime) -> Transition:
    """Dispatch every attempt whose retry is due by ``now``."""
    out = Transition()
    if run.status is not RunStatus.RUNNING:
        return out
    for name, state in run.steps.items():
        due = state.retry_at
        if due is not None and due <= now and state.status is StepStatus.PENDING:
            _dispatch(run, out, name, state.attempt)
    return out


def next_retry(run: RunState) -> datetime | None:
    """When the first of ``run``'s waiting retries is due; None if none waits."""
    due = [s.retry_at for s in run.steps.values() if s.retry_at is not None]
    return min(due) if due and run.status is RunStatus.RUNNING else None


def renew_lease(run: RunState, step: str, attempt: int, until: datetime) -> None:
    """Extend the lease of ``step``'s running ``attempt`` (a stale attempt has none)."""
    state = run.steps.get(step)
    if state is not None and state.attempt == attempt and state.status is StepStatus.RUNNING:
        state.lease_until = until


def grant_leases(run: RunState, until: datetime) -> None:
    """Give every running attempt without a lease one until ``until`` (after a restart)."""
    for state in run.steps.values():
        if state.status is StepStatus.RUNNING and state.lease_until is None:
            state.lease_until = until


def extend_leases(run: RunState, by: timedelta) -> None:
    """Extend every lease by ``by``: the controller was stalled, not the workers."""
    for state in run.steps.values():
        if state.lease_until is not None:
            state.lease_until += by


def expire_leases(run: RunState, now: datetime, *, max_lost: int) -> Transition:
    """Start a new attempt of every step whose lease lapsed before ``now``; the old attempt
    is told to stop, and its late outcome is ignored (it is no longer current). A step
    whose attempts were lost ``max_lost`` times fails instead."""
    out = Transition()
    if run.status is not RunStatus.RUNNING:
        return out
    lapsed = [
        name
        for name, state in run.steps.items()
        if state.status is StepStatus.RUNNING
        and state.lease_until is not None
        and state.lease_until < now
    ]
    for name in lapsed:
        state = run.steps[name]
        state.lost += 1
        state.lease_until = None
        who = state.worker or "its worker"
        error = f"attempt {state.attempt} lost: {who} stopped renewing its lease"
        out.emit.append(
            AttemptsCancelled(run_id=run.run_id, attempts={name: state.attempt}, reason=error)
        )
        if state.lost < max_lost:
            update = StepUpdate(
                name, StepStatus.PENDING, state.attempt + 1, error=error, lost=state.lost
            )
            out.emit.append(_status_event(run, update))
            _dispatch(run, out, name, update.attempt, update)
            continue
        error = f"its attempts were lost {state.lost} times (last: {who} stopped answering)"
        failed = StepUpdate(
            name, StepStatus.FAILED, state.attempt, finished=now, error=error, lost=state.lost
        )
        _record(run, out, failed)
        _skip_downstream(run, out, name, now)
    if lapsed:
        _top_up(run, out)
        _finish_if_done(run, out)
    return out
