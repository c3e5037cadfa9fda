"""``/healthz`` and ``/metrics`` (Prometheus text format, written by hand).

Health: the metadata store answers, the broker of each started stack is reachable, and the
controller of the served stack runs (when it is embedded in this process). Metrics: runs by
stack and status, a histogram of step durations, and the depth of the broker's queues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from conveyor.contracts import RunStatus
from conveyor.service.api.schemas import Health, HealthCheck
from conveyor.service.api.security import require_user
from conveyor.service.api.state import ApiState, state_of
from conveyor.service.engine import Conveyor
from conveyor.service.gateway import RunGateway

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BOUNDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
PROBE_TIMEOUT_S = 3.0

router = APIRouter(tags=["operations"])


async def _store_check(state: ApiState) -> HealthCheck:
    try:
        await asyncio.wait_for(state.summaries.ping(), PROBE_TIMEOUT_S)
    except Exception as exc:
        return HealthCheck(ok=False, detail=f"metadata store: {type(exc).__name__}: {exc}")
    return HealthCheck(ok=True, detail="metadata store answers")


async def _broker_check(conveyor: Conveyor) -> HealthCheck:
    try:
        found = await asyncio.wait_for(conveyor.broker.reachability(), PROBE_TIMEOUT_S)
    except TimeoutError:
        return HealthCheck(ok=False, detail=f"broker did not answer in {PROBE_TIMEOUT_S}s")
    return HealthCheck(ok=found.ok, detail=found.detail)


def _controller_check(conveyor: Conveyor) -> HealthCheck:
    alive = conveyor.controller_alive
    if alive is None:
        return HealthCheck(ok=True, detail="runs outside this server (conveyor controller start)")
    if not alive:
        return HealthCheck(ok=False, detail="stopped")
    problem = conveyor.controller_problem
    if problem is not None:
        return HealthCheck(ok=False, detail=f"running in this process but failing: {problem}")
    return HealthCheck(ok=True, detail="running in this process")


async def health(state: ApiState) -> tuple[bool, Health]:
    gateway = state.gateway
    checks = {"store": await _store_check(state)}
    for conveyor in gateway.conveyors():
        assert conveyor.stack is not None
        suffix = "" if conveyor is gateway.served else f":{conveyor.stack.name}"
        checks[f"broker{suffix}"] = await _broker_check(conveyor)
    checks["controller"] = _controller_check(gateway.served)
    ok = all(c.ok for c in checks.values())
    return ok, Health(status="ok" if ok else "unhealthy", stack=gateway.stack.name, checks=checks)


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(state: ApiState = Depends(state_of)) -> Response:
    """Whether the store and broker are reachable and the controller runs (503 if not)."""
    ok, report = await health(state)
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if ok else 503)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


async def _queue_depths(gateway: RunGateway) -> list[str]:
    samples = []
    for conveyor in gateway.conveyors():
        assert conveyor.stack is not None
        try:
            depths = await asyncio.wait_for(conveyor.broker.queue_depths(), PROBE_TIMEOUT_S)
        except Exception:
            # A broker that does not answer shows as missing samples (and in /healthz).
            continue
        for queue, depth in sorted(depths.items()):
            labels = _labels(stack=conveyor.stack.name, queue=queue)
            samples.append(f"conveyor_queue_depth{labels} {depth}")
    return samples


async def render(state: ApiState) -> str:
    """Every metric family in Prometheus' text exposition format."""
    summaries = state.summaries
    counts = await summaries.runs_by_status()
    stacks = sorted({stack for stack, _, _ in counts} | {state.gateway.stack.name})
    by_key = {(stack, status): n for stack, status, n in counts}
    runs = [
        f"conveyor_runs{_labels(stack=stack, status=status.value)} {by_key.get((stack, status), 0)}"
        for stack in stacks
        for status in RunStatus
    ]
    buckets = await summaries.step_durations(DURATION_BOUNDS)
    durations = [
        f'conveyor_step_duration_seconds_bucket{{le="{bound:g}"}} {count}'
        for bound, count in zip(buckets.bounds, buckets.cumulative, strict=True)
    ]
    durations += [
        f'conveyor_step_duration_seconds_bucket{{le="+Inf"}} {buckets.count}',
        f"conveyor_step_duration_seconds_sum {buckets.total:.6f}",
        f"conveyor_step_duration_seconds_count {buckets.count}",
    ]
    served = state.gateway.served
    alive = served.controller_alive
    lines = [
        *_family("conveyor_runs", "gauge", "Runs in the metadata store by stack and status.", runs),
        *_family(
            "conveyor_step_duration_seconds",
            "histogram",
            "How long finished step attempts ran.",
            durations,
        ),
        *_family(
            "conveyor_queue_depth",
            "gauge",
            "Messages waiting in a queue of a stack's broker.",
            await _queue_depths(state.gateway),
        ),
        *_family(
            "conveyor_controller_up",
            "gauge",
            "Whether the served stack's controller runs in this server (absent: elsewhere).",
            []
            if alive is None
            else [f"conveyor_controller_up{_labels(stack=state.gateway.stack.name)} {int(alive)}"],
        ),
        *_family(
            "conveyor_server_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            [f"conveyor_server_uptime_seconds {time.monotonic() - state.started:.3f}"],
        ),
    ]
    return "\n".join(lines) + "\n"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_user)],
    responses={200: {"content": {PROMETHEUS_TEXT: {}}}},
)
async def metrics(state: ApiState = Depends(state_of)) -> Response:
    """Prometheus metrics: runs by status, step durations, queue depths."""
    return Response(await render(state), media_type=PROMETHEUS_TEXT)
