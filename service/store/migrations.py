"""Versioned schema migrations of the metadata store; append, never edit a shipped one."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: stacks, components, runs, steps, artifacts, the outbox
    """
    CREATE TABLE components (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        name TEXT NOT NULL,
        flavor TEXT NOT NULL,
        config TEXT NOT NULL,
        owner TEXT NOT NULL,
        shared INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL,
        UNIQUE (type, name)
    );
    CREATE TABLE stacks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        shared INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL
    );
    CREATE TABLE stack_components (
        stack_id TEXT NOT NULL REFERENCES stacks (id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        component_id TEXT NOT NULL REFERENCES components (id),
        PRIMARY KEY (stack_id, type)
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        stack_id TEXT NOT NULL,
        stack_name TEXT NOT NULL,
        stack_snapshot TEXT NOT NULL,
        status TEXT NOT NULL,
        parameters TEXT NOT NULL,
        spec TEXT NOT NULL,
        created TEXT NOT NULL,
        started TEXT,
        finished TEXT,
        error TEXT,
        idempotency_key TEXT UNIQUE,
        owner_host TEXT,
        owner_pid INTEGER,
        owner_token TEXT
    );
    CREATE INDEX runs_by_stack ON runs (stack_id, created);
    CREATE INDEX runs_by_status ON runs (status);
    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        position INTEGER NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL DEFAULT 0,
        started TEXT,
        finished TEXT,
        duration_s REAL,
        error TEXT,
        traceback TEXT,
        pid INTEGER,
        worker TEXT,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE artifacts (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step_name TEXT NOT NULL,
        output_name TEXT NOT NULL,
        uri TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        materializer TEXT NOT NULL,
        data_type TEXT NOT NULL,
        created TEXT NOT NULL,
        UNIQUE (run_id, step_name, output_name)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        stack_id TEXT NOT NULL,
        event TEXT NOT NULL,
        created TEXT NOT NULL,
        sent TEXT
    );
    CREATE INDEX outbox_unsent ON outbox (stack_id) WHERE sent IS NULL;
    """,
    # 2: what each step's last attempt printed
    """
    ALTER TABLE steps ADD COLUMN logs TEXT;
    """,
    # 3: digests name their algorithm (blake3 now; the bare sha256 of older artifacts)
    """
    ALTER TABLE artifacts RENAME COLUMN sha256 TO digest;
    UPDATE artifacts SET digest = 'sha256:' || digest WHERE digest NOT LIKE '%:%';
    """,
    # 4: runs requested through a broker that no controller has recorded yet (queued), kept
    # by the client that asked, beside the runs; people read both through the view
    """
    CREATE TABLE run_requests (
        id TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        stack_id TEXT NOT NULL,
        stack_name TEXT NOT NULL,
        parameters TEXT NOT NULL,
        spec TEXT NOT NULL,
        created TEXT NOT NULL,
        idempotency_key TEXT
    );
    CREATE VIEW runs_and_requests AS
        SELECT id, pipeline, stack_id, stack_name, stack_snapshot, status, parameters, spec,
               created, started, finished, error, idempotency_key
        FROM runs
        UNION ALL
        SELECT id, pipeline, stack_id, stack_name, '{}', 'queued', parameters, spec,
               created, NULL, NULL, NULL, idempotency_key
        FROM run_requests WHERE id NOT IN (SELECT id FROM runs);
    """,
    # 5: when a pending attempt that waits for its retry is due
    """
    ALTER TABLE steps ADD COLUMN retry_at TEXT;
    """,
    # 6: the version of the materializer that wrote each artifact (NULL before it was kept)
    """
    ALTER TABLE artifacts ADD COLUMN materializer_version TEXT;
    """,
    # 7: step caching and retried runs: each step's cache key (indexed, to find an earlier
    # step with the same key), the run a cached step's outputs came from, and the run a run
    # retries; people read it through the view, which is made again with the column
    """
    ALTER TABLE steps ADD COLUMN cache_key TEXT;
    ALTER TABLE steps ADD COLUMN cached_from TEXT;
    CREATE INDEX steps_cache_key ON steps (cache_key) WHERE cache_key IS NOT NULL;
    ALTER TABLE runs ADD COLUMN retry_of TEXT;
    CREATE INDEX runs_retry_of ON runs (retry_of) WHERE retry_of IS NOT NULL;
    DROP VIEW runs_and_requests;
    CREATE VIEW runs_and_requests AS
        SELECT id, pipeline, stack_id, stack_name, stack_snapshot, status, parameters, spec,
               created, started, finished, error, idempotency_key, retry_of,
               (SELECT group_concat(r.id) FROM runs r WHERE r.retry_of = runs.id) AS retried_by
        FROM runs
        UNION ALL
        SELECT id, pipeline, stack_id, stack_name, '{}', 'queued', parameters, spec,
               created, NULL, NULL, NULL, idempotency_key, NULL, NULL
        FROM run_requests WHERE id NOT IN (SELECT id FROM runs);
    """,
    # 8: users of a server (tokens kept as sha256 digests only) and who submitted each run
    # (a table beside the runs, so the controller's writes stay as they were; a run without
    # a row was submitted by the local user, "default", as every run before users)
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created TEXT NOT NULL
    );
    CREATE TABLE run_users (run_id TEXT PRIMARY KEY, user_name TEXT NOT NULL);
    CREATE INDEX run_users_by_user ON run_users (user_name);
    DROP VIEW runs_and_requests;
    CREATE VIEW runs_and_requests AS
        SELECT seen.*, COALESCE(ru.user_name, 'default') AS submitted_by
        FROM (
            SELECT id, pipeline, stack_id, stack_name, stack_snapshot, status, parameters, spec,
                   created, started, finished, error, idempotency_key, retry_of,
                   (SELECT group_concat(r.id) FROM runs r WHERE r.retry_of = runs.id)
                       AS retried_by
            FROM runs
            UNION ALL
            SELECT id, pipeline, stack_id, stack_name, '{}', 'queued', parameters, spec,
                   created, NULL, NULL, NULL, idempotency_key, NULL, NULL
            FROM run_requests WHERE id NOT IN (SELECT id FROM runs)
        ) AS seen
        LEFT JOIN run_users ru ON ru.run_id = seen.id;
    """,
    # 9: a token may expire (ISO time, UTC; NULL: it works until rotated)
    """
    ALTER TABLE users ADD COLUMN token_expires TEXT;
    """,
    # 10: what changed in a run since a follower last looked. A run's marker counts the
    # controller's transactions that changed its steps; a step records the marker of its
    # last change. A small table of its own, not a column of ``runs``: SQLite rewrites a
    # row whole, and a run's row holds its spec (megabytes for a large fan-out). No index
    # on ``changed``: it would be rewritten with every step change of every run (a third
    # more per change on the controller's path), for a read that runs only when something
    # changed in a followed run and scans that run's steps by the key (1.5 ms for 10,000).
    """
    CREATE TABLE run_changes (
        run_id TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
        marker INTEGER NOT NULL
    );
    ALTER TABLE steps ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
    """,
    # 11: requests their client withdrew before any controller took them (Ctrl+C while none
    # ran). A controller that takes such a request later records the run cancelled, unstarted,
    # whenever the cancellation message reaches it; it drops the row when it records the run.
    """
    CREATE TABLE withdrawn_requests (
        id TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        withdrawn TEXT NOT NULL
    );
    """,
    # 12: the step pools each stack's runs named, one row a pool: a change that moves a
    # stack's queues asks the broker about those step queues too (a worker started with
    # --pool of a pool the orchestrator does not list consumes one). A table of its own,
    # read by key: finding them in the runs' specs would parse every spec of the stack.
    # Filled from the runs recorded so far.
    """
    CREATE TABLE stack_pools (
        stack_id TEXT NOT NULL,
        pool TEXT NOT NULL,
        PRIMARY KEY (stack_id, pool)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO stack_pools (stack_id, pool)
        SELECT DISTINCT r.stack_id, json_extract(step.value, '$.pool')
        FROM (SELECT stack_id, spec FROM runs WHERE json_valid(spec)) AS r,
             json_each(r.spec, '$.steps') AS step
        WHERE json_type(step.value, '$.pool') = 'text';
    """,
    # 13: the attempts of each step that were not its own failures and use none of its
    # retries: lost with their worker (the step fails once they reach ``max_lost``), and a
    # rider's run again on the recorded inputs. Kept with the step, not in the controller's
    # memory alone: a controller that reloads its states (after a failed batch, or at a
    # restart) would otherwise charge them to the step's retries.
    """
    ALTER TABLE steps ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE steps ADD COLUMN redone INTEGER NOT NULL DEFAULT 0;
    """,
    # 14: the process whose embedded controller queued a request (its run queue), so that
    # the requests of a process that died end, as its runs are failed; NULL for a
    # request a client made of a service stack, which its controller takes whenever it runs
    """
    ALTER TABLE run_requests ADD COLUMN owner_host TEXT;
    ALTER TABLE run_requests ADD COLUMN owner_pid INTEGER;
    ALTER TABLE run_requests ADD COLUMN owner_token TEXT;
    """,
)
