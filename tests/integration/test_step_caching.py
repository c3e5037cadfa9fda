"""Step caching and retried runs on the embedded stack, as a user runs them: ``conveyor``
in subprocesses on a pipeline file that the test rewrites, a real SQLite file, a real
artifact directory. Which steps really ran is counted through a file each step appends to."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from conveyor import Client, StepStatus
from conveyor.service.public_records import public_run
from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import run_id_in

PIPELINE = """
from pathlib import Path

from conveyor import pipeline, step

EXECUTED = Path(__file__).with_name("executed.log")


def note(name):
    with EXECUTED.open("a") as log:
        log.write(name + "\\n")


def scale(x):
    return x * 2


@step
def load(n: int) -> list[int]:
    note("load")
    return list(range(n))


@step
def double(xs: list[int]) -> list[int]:
    note("double")
    return [scale(x) for x in xs]


@step
def square(xs: list[int], power: int = 2) -> list[int]:
    note("square")
    return [x**power for x in xs]


@step
def total(a: list[int], b: list[int]) -> int:
    note("total")
    return sum(a) + sum(b)


@pipeline
def p(n: int = 4, power: int = 2) -> None:
    xs = load(n)
    total(double(xs), square(xs, power))
"""


def write(folder: Path, source: str = PIPELINE) -> None:
    (folder / "pipe.py").write_text(textwrap.dedent(source))


def described(run_id: str) -> dict[str, Any]:
    """What ``conveyor run describe RUN -o json`` prints, read in this process (the command's
    own output is tested by tests/integration/test_cli_runs.py and test_json_shapes.py; a
    subprocess per read cost most of this module's time)."""
    with Client() as client:
        record = client.get_run(run_id)
        steps = client.get_steps(record.id)
    return {
        "run": public_run(record).model_dump(mode="json"),
        "steps": [s.model_dump(mode="json") for s in steps],
    }


def run(folder: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    """``conveyor pipeline run pipe.py:p ARGS`` in ``folder``; the run and its steps, and
    which steps ran (in any order)."""
    (folder / "executed.log").unlink(missing_ok=True)
    result = conveyor_cli("pipeline", "run", "pipe.py:p", *args, cwd=folder)
    assert result.returncode == expect, result.stderr
    with Client() as client:
        [latest] = client.list_runs(limit=1)
    assert latest.id == run_id_in(result.stderr)
    described_run = described(latest.id)
    executed = folder / "executed.log"
    ran = sorted(executed.read_text().split()) if executed.exists() else []
    steps = {s["name"]: s for s in described_run["steps"]}
    return {"run": described_run["run"], "steps": steps, "ran": ran, "stderr": result.stderr}


def statuses(done: dict[str, Any]) -> dict[str, str]:
    return {name: s["status"] for name, s in done["steps"].items()}


def test_a_second_run_is_cached_and_a_change_reruns_that_step_and_those_below(
    tmp_path: Path,
) -> None:
    write(tmp_path)
    first = run(tmp_path)
    assert first["ran"] == ["double", "load", "square", "total"]
    first_id = first["run"]["id"]

    second = run(tmp_path)
    assert second["ran"] == []
    assert set(statuses(second).values()) == {"cached"}
    assert {s["cached_from"] for s in second["steps"].values()} == {first_id}
    assert f"cached    load from run {first_id}" in second["stderr"]
    with Client() as client:
        handle_steps = {s.name: s for s in client.get_steps(second["run"]["id"])}
        assert handle_steps["total"].status is StepStatus.CACHED
    table = conveyor_cli("run", "describe", second["run"]["id"]).stdout
    assert f"Cached from run {first_id}: load, double, square, total" in table

    # A helper that double calls changes: double and total run again, nothing else.
    write(tmp_path, PIPELINE.replace("return x * 2", "return x * 3"))
    changed = run(tmp_path)
    assert changed["ran"] == ["double", "total"]
    assert statuses(changed) == {
        "load": "cached",
        "double": "completed",
        "square": "cached",
        "total": "completed",
    }

    # Formatting and comments elsewhere change nothing.
    write(
        tmp_path,
        PIPELINE.replace("return x * 2", "return x * 3").replace(
            "def note(name):", "# notes what ran\ndef note( name ):"
        ),
    )
    assert run(tmp_path)["ran"] == []

    # One parameter: the step that takes it, and those below.
    by_param = run(tmp_path, "-p", "power=3")
    assert by_param["ran"] == ["square", "total"]
    assert by_param["run"]["status"] == "completed"


def test_a_deleted_or_corrupted_output_is_a_miss_and_the_run_completes(tmp_path: Path) -> None:
    write(tmp_path)
    first = run(tmp_path)
    square_file = Path(urlparse(first["steps"]["square"]["outputs"]["output"]["uri"]).path)
    assert square_file.is_file()

    square_file.unlink()
    deleted = run(tmp_path)
    # square runs again and writes the same bytes: total, reading them, is still cached.
    assert deleted["ran"] == ["square"]
    assert deleted["run"]["status"] == "completed"
    assert statuses(deleted)["square"] == "completed" and square_file.is_file()

    data = bytearray(square_file.read_bytes())
    data[0] ^= 0xFF  # damaged in place: the same size
    square_file.write_bytes(bytes(data))
    corrupted = run(tmp_path)
    assert corrupted["ran"] == ["square"]
    assert corrupted["run"]["status"] == "completed"
    # The bytes were written afresh: the next run reuses them.
    assert run(tmp_path)["ran"] == []


def test_cache_off_on_a_step_a_pipeline_or_a_run_runs_again(tmp_path: Path) -> None:
    write(tmp_path)
    run(tmp_path)
    assert run(tmp_path, "--no-cache")["ran"] == ["double", "load", "square", "total"]
    write(tmp_path, PIPELINE.replace("@step\ndef square", "@step(cache=False)\ndef square"))
    # square runs; its output has the same bytes, so total is still reused.
    assert run(tmp_path)["ran"] == ["square"]
    write(tmp_path, PIPELINE.replace("@pipeline\n", "@pipeline(cache=False)\n"))
    assert run(tmp_path)["ran"] == ["double", "load", "square", "total"]


TWINS = """
from pathlib import Path

from conveyor import pipeline, step

EXECUTED = Path(__file__).with_name("executed.log")


@step
def load(n: int) -> list[int]:
    return list(range(n))


@step
def slow_sum(xs: list[int]) -> int:
    import time

    with EXECUTED.open("a") as log:
        log.write("slow_sum\\n")
    time.sleep(0.3)
    return sum(xs)


@step
def both(a: int, b: int) -> int:
    return a + b


@pipeline
def p(n: int = 5) -> None:
    xs = load(n)
    both(slow_sum(xs), slow_sum(xs))
"""


def test_two_identical_steps_in_one_run_compute_once(tmp_path: Path) -> None:
    write(tmp_path, TWINS)
    done = run(tmp_path)
    assert done["ran"] == ["slow_sum"]
    assert done["run"]["status"] == "completed"
    twins = [done["steps"]["slow_sum"], done["steps"]["slow_sum_2"]]
    assert sorted(s["status"] for s in twins) == ["cached", "completed"]
    cached = next(s for s in twins if s["status"] == "cached")
    assert cached["cached_from"] == done["run"]["id"]
    with Client() as client:
        assert (
            client.load_artifact(
                next(
                    a.id
                    for a in client.list_artifacts(run_id=done["run"]["id"])
                    if a.step_name == "both"
                )
            )
            == 20
        )


FIVE = """
from pathlib import Path

from conveyor import pipeline, step

HERE = Path(__file__).parent
EXECUTED = HERE / "executed.log"


def note(name):
    with EXECUTED.open("a") as log:
        log.write(name + "\\n")


@step
def one(n: int) -> int:
    note("one")
    return n


@step
def two(x: int) -> int:
    note("two")
    return x + 1


@step
def three(x: int) -> int:
    note("three")
    if not (HERE / "fixed.flag").exists():
        raise ValueError("the bug in three")
    return x * 10


@step
def four(x: int) -> int:
    note("four")
    return x + 2


@step
def five(x: int) -> int:
    note("five")
    return x * 2


@pipeline
def p(n: int = 3) -> None:
    five(four(three(two(one(n)))))
"""


def test_a_failed_run_is_retried_reusing_what_completed(tmp_path: Path) -> None:
    write(tmp_path, FIVE)
    failed = run(tmp_path, "-p", "n=4", expect=1)
    assert failed["ran"] == ["one", "three", "two"]
    assert statuses(failed) == {
        "one": "completed",
        "two": "completed",
        "three": "failed",
        "four": "skipped",
        "five": "skipped",
    }
    failed_id = failed["run"]["id"]

    (tmp_path / "fixed.flag").touch()
    (tmp_path / "executed.log").unlink()
    retried = conveyor_cli("run", "retry", failed_id[:8], cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert sorted((tmp_path / "executed.log").read_text().split()) == ["five", "four", "three"]
    assert "five.output = 104" in retried.stdout  # ((4 + 1) * 10 + 2) * 2
    with Client() as client:
        [latest] = client.list_runs(limit=1)
    new = described(latest.id)
    new_steps = {s["name"]: s for s in new["steps"]}
    assert {n: s["status"] for n, s in new_steps.items()} == {
        "one": "cached",
        "two": "cached",
        "three": "completed",
        "four": "completed",
        "five": "completed",
    }
    assert new_steps["one"]["cached_from"] == failed_id
    assert new["run"]["retry_of"] == failed_id
    old = described(failed_id)
    assert old["run"]["retried_by"] == [new["run"]["id"]]
    assert f"Retry of run {failed_id}" in conveyor_cli("run", "describe", new["run"]["id"]).stdout
    assert f"Retried by run {new['run']['id']}" in conveyor_cli("run", "describe", failed_id).stdout

    # Only a failed or cancelled run may be retried.
    refused = conveyor_cli("run", "retry", new["run"]["id"], cwd=tmp_path)
    assert refused.returncode == 1
    assert "only a failed or cancelled run can be retried" in refused.stderr
    for hostile in ("%", "_", "x" * 10_000):
        answer = conveyor_cli("run", "retry", hostile, cwd=tmp_path)
        assert answer.returncode == 1 and "Traceback" not in answer.stderr


def test_a_retry_from_another_folder_compiles_where_the_run_was_submitted(
    tmp_path: Path,
) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "flows").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "flows" / "pipe.py").write_text(textwrap.dedent(FIVE))
    failed = conveyor_cli("pipeline", "run", "flows/pipe.py:p", cwd=project)
    assert failed.returncode == 1, failed.stderr
    failed_id = run_id_in(failed.stderr)

    (project / "flows" / "fixed.flag").touch()
    retried = conveyor_cli("run", "retry", failed_id, cwd=elsewhere)
    assert retried.returncode == 0, retried.stderr
    assert f"from {project}, the folder it was submitted from" in retried.stderr
    assert "five.output = 84" in retried.stdout  # ((3 + 1) * 10 + 2) * 2
    assert not list(elsewhere.iterdir())

    # The folder is gone: the error says where the reference was looked for, and why.
    (project / "flows" / "fixed.flag").unlink()
    again = conveyor_cli("pipeline", "run", "--no-cache", "flows/pipe.py:p", cwd=project)
    assert again.returncode == 1, again.stderr
    project.rename(tmp_path / "moved")
    gone = conveyor_cli("run", "retry", run_id_in(again.stderr), cwd=elsewhere)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    said = " ".join(gone.stderr.split())
    assert f"looked for from {elsewhere}; the run was submitted from {project}" in said
    assert "which is gone" in said


def test_client_retry_run_picks_up_a_fixed_bug_in_the_code(
    tmp_path: Path, monkeypatch: Any
) -> None:
    broken = FIVE.replace('if not (HERE / "fixed.flag").exists():', "if True:")
    write(tmp_path, broken)
    failed = run(tmp_path, expect=1)
    write(tmp_path, FIVE.replace('if not (HERE / "fixed.flag").exists():', "if False:"))
    (tmp_path / "executed.log").unlink()
    monkeypatch.chdir(tmp_path)
    with Client() as client:
        handle = client.retry_run(failed["run"]["id"])
    assert handle.status.value == "completed"
    assert handle.load("five") == 2 * (10 * (3 + 1) + 2)
    assert handle.step_statuses["one"] is StepStatus.CACHED
    assert handle.record.retry_of == failed["run"]["id"]
    assert sorted((tmp_path / "executed.log").read_text().split()) == ["five", "four", "three"]


async def test_the_api_shows_cached_steps_and_takes_cache_false(home: Path) -> None:
    from tests.integration.api_helpers import QUICKSTART, serving, submit, wait_status

    async with serving(home) as (_, api):
        first = await submit(api)
        assert (await wait_status(api, first["id"]))["status"] == "completed"
        second = await submit(api)
        assert (await wait_status(api, second["id"]))["status"] == "completed"
        steps = (await api.get(f"/api/runs/{second['id']}/steps")).json()
        assert {s["status"] for s in steps} == {"cached"}
        assert {s["cached_from"] for s in steps} == {first["id"]}
        one = (await api.get(f"/api/runs/{second['id']}/steps/{steps[0]['name']}")).json()
        assert one["status"] == "cached" and one["outputs"]
        third = await submit(api, cache=False)
        assert (await wait_status(api, third["id"]))["status"] == "completed"
        steps = (await api.get(f"/api/runs/{third['id']}/steps")).json()
        assert {s["status"] for s in steps} == {"completed"}
        assert {s["cached_from"] for s in steps} == {None}
        run = (await api.get(f"/api/runs/{third['id']}")).json()
        assert run["retry_of"] is None and run["retried_by"] == []
        for hostile in ("no", 2, None, [], "%"):
            refused = await api.post("/api/runs", json={"pipeline": QUICKSTART, "cache": hostile})
            assert refused.status_code == 422, (hostile, refused.text)


async def test_the_api_retries_a_failed_run(home: Path, tmp_path: Path) -> None:
    from tests.integration.api_helpers import serving, submit, wait_status

    write(tmp_path, FIVE)
    async with serving(home, pipelines=tmp_path) as (_, api):
        failed = await submit(api, f"{tmp_path / 'pipe.py'}:p")
        assert (await wait_status(api, failed["id"]))["status"] == "failed"
        (tmp_path / "fixed.flag").touch()
        answer = await api.post(f"/api/runs/{failed['id'][:10]}/retry")
        assert answer.status_code == 201, answer.text
        retry = answer.json()
        assert retry["retry_of"] == failed["id"]
        assert answer.headers["location"] == f"/api/runs/{retry['id']}"
        assert (await wait_status(api, retry["id"]))["status"] == "completed"
        steps = {s["name"]: s for s in (await api.get(f"/api/runs/{retry['id']}/steps")).json()}
        assert [steps[n]["status"] for n in ("one", "two", "three")] == [
            "cached",
            "cached",
            "completed",
        ]
        assert (await api.get(f"/api/runs/{failed['id']}")).json()["retried_by"] == [retry["id"]]
        refused = await api.post(f"/api/runs/{retry['id']}/retry")
        assert refused.status_code == 409 and "nothing to retry" in refused.text
        for hostile in ("%25", "_", "x" * 300):
            assert (await api.post(f"/api/runs/{hostile}/retry")).status_code in (404, 422)
