"""Opening a client's state: the store, the default stack, and recovery of dead runs."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from conveyor.contracts import NotFoundError, RunRecord, RunStatus
from conveyor.service.home import Home
from conveyor.service.liveness import is_alive, this_process
from conveyor.service.stacks import StackService
from conveyor.service.store import ArtifactRecords, Database, OwnedRuns, RunRequests, RunStore
from conveyor.service.users import Actor, UserService
from conveyor.workers.loggers import get_logger


@dataclass
class Services:
    """What every entry point (SDK, CLI, HTTP) works through, opened on one home."""

    home: Home
    db: Database
    stacks: StackService
    runs: RunStore
    run_requests: RunRequests
    owned_runs: OwnedRuns
    artifacts: ArtifactRecords
    users: UserService

    @classmethod
    async def open(cls, home: str | Path | Home | None = None) -> Services:
        """Open the store, create the default stack on first use, fail dead runs."""
        resolved = home if isinstance(home, Home) else Home.resolve(home)
        await asyncio.to_thread(resolved.check)
        db = Database(resolved.db_path)
        await db.open()
        services = cls(
            resolved,
            db,
            StackService(db, resolved),
            RunStore(db),
            RunRequests(db),
            OwnedRuns(db),
            ArtifactRecords(db),
            UserService(db),
        )
        try:
            await services.stacks.ensure_default()
            await services.fail_dead_runs()
        except BaseException:
            await db.close()
            raise
        return services

    def as_user(self, actor: Actor) -> Services:
        """The same services, with stacks and components seen and changed by ``actor``
        (nothing new is opened: closing the original closes both)."""
        return dataclasses.replace(self, stacks=self.stacks.for_user(actor))

    async def list_runs(
        self,
        *,
        stack: str | None = None,
        pipeline: str | None = None,
        status: RunStatus | None = None,
        user: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by stack (a name or id), pipeline, status and who
        submitted them. Runs outlive their stack: a deleted stack's name still finds them."""
        stack_id = stack_name = None
        if stack:
            try:
                stack_id = (await self.stacks.get(stack)).id
            except NotFoundError:
                if not await self.runs.list_runs(stack_name=stack, limit=1):
                    raise
                stack_name = stack
        return await self.runs.list_runs(
            stack_id=stack_id,
            stack_name=stack_name,
            pipeline=pipeline,
            status=status,
            user=user,
            limit=limit,
            offset=offset,
        )

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Services:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def fail_dead_runs(self) -> list[str]:
        """Mark failed the unfinished runs whose embedded controller process died, and the
        runs it queued, which never started."""
        host, _, _ = this_process()
        failed = []
        for run_id, pid, token in await self.owned_runs.active(host):
            if not is_alive(pid, token):
                reason = f"the process that ran it (pid {pid}) died before the run finished"
                await self.owned_runs.end_unfinished([run_id], RunStatus.FAILED, reason)
                get_logger("conveyor").warning(
                    "run abandoned by a dead process", run_id=run_id, pid=pid
                )
                failed.append(run_id)
        for run_id, pid, token in await self.owned_runs.queued(host):
            if not is_alive(pid, token):
                reason = f"the process that queued it (pid {pid}) died before the run started"
                if await self.owned_runs.end_queued([run_id], RunStatus.FAILED, reason):
                    get_logger("conveyor").warning(
                        "queued run failed: the process that queued it died",
                        run_id=run_id,
                        pid=pid,
                    )
                    failed.append(run_id)
        return failed
