"""``conveyor stack ...``, and runs on several stacks, as a user types them.

The end-to-end scenarios run the real ``conveyor`` command in subprocesses against the test's
CONVEYOR_HOME; the rule checks use typer's CliRunner in-process, for speed.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conveyor.service.cli.app import app
from tests.conftest import conveyor_cli
from tests.integration.cli_helpers import (
    as_json,
    cli,
    local_only,
    ok,
    refused,
    rows,
    runs_pipelines,
)

# Each test runs against a local store and against a server (tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("place")

QUICKSTART = "examples/quickstart.py:training_pipeline"


def sh(*args: str, home: Path | None = None, **env: str) -> str:
    """Run ``conveyor ARGS`` in a subprocess; its stdout, after checking it succeeded."""
    return sh_both(*args, home=home, **env)[0]


def said(*args: str, home: Path | None = None, **env: str) -> str:
    """Run ``conveyor ARGS`` in a subprocess; the status lines it wrote to stderr, after
    checking it succeeded and wrote nothing to stdout (it is a change, not a query)."""
    stdout, stderr = sh_both(*args, home=home, **env)
    assert stdout == "", (args, stdout)
    return stderr


def sh_both(*args: str, home: Path | None = None, **env: str) -> tuple[str, str]:
    extra = {**env, **({"CONVEYOR_HOME": str(home)} if home else {})}
    result = conveyor_cli(*args, env=extra)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout, result.stderr


def sh_json(*args: str, home: Path | None = None) -> Any:
    return json.loads(sh(*args, "--output", "json", home=home))


def run_quickstart(*args: str, **env: str) -> str:
    """Run the quickstart; the id of its run."""
    out, said = sh_both("pipeline", "run", QUICKSTART, "-p", "n_samples=200", *args, **env)
    assert "evaluate.output = " in out
    # What the run does goes to stderr (a second run on one home reuses its steps).
    assert re.search(r"(completed|cached) +evaluate", said), said
    found = re.search(r"on stack '([^']+)' as run ([0-9a-f]+)", said)
    assert found is not None, out
    return found.group(2)


def components_of(described: dict[str, Any]) -> dict[str, Any]:
    """A described stack without ids: what must be equal after export and import."""
    return {t: (c["name"], c["flavor"], c["config"]) for t, c in described["components"].items()}


@runs_pipelines
def test_two_stacks_switch_run_on_each_and_export_into_a_fresh_home(
    home: Path, tmp_path: Path, place: str
) -> None:
    second = tmp_path / "second-artifacts"
    sh("artifact-store", "register", "second", "--flavor", "local", f"--path={second}")
    sh("orchestrator", "register", "fast", "--flavor", "local", "--concurrency=2")
    sh("stack", "register", "two", "-o", "fast", "-a", "second")

    on_default = run_quickstart()
    assert "Active stack set to 'two'" in said("stack", "set", "two")
    assert "The active stack is 'two'" in sh("stack", "get")
    listed = rows(sh("stack", "list"))
    assert listed[0] == [
        "ACTIVE",
        "STACK NAME",
        "STACK ID",
        "SHARED",
        "OWNER",
        "ARTIFACT_STORE",
        "ORCHESTRATOR",
    ]
    assert [(r[0], r[1], r[5], r[6]) for r in listed[1:]] == [
        ("", "default", "default", "default"),
        ("👉", "two", "second", "fast"),
    ]
    described = sh("stack", "describe")
    assert "'two' stack (ACTIVE)" in described
    assert ["ARTIFACT_STORE", "second"] in rows(described)
    assert ["concurrency", "2"] in rows(described)

    on_two = run_quickstart()
    assert [r["id"] for r in sh_json("run", "list", "--stack", "two")] == [on_two]
    assert [r["id"] for r in sh_json("run", "list", "--stack", "default")] == [on_default]
    table = rows(sh("run", "list", "--stack", "two"))
    assert [(r[0], r[2], r[3]) for r in table[1:]] == [(on_two, "two", "completed")]
    assert {r[0]: r[2] for r in rows(sh("run", "list"))[1:]} == {
        on_two: "two",
        on_default: "default",
    }
    # Each run wrote its artifacts to the artifact store of the stack it ran on.
    two_uris = [a["ref"]["uri"] for a in sh_json("artifact", "list", "--run", on_two)]
    default_uris = [a["ref"]["uri"] for a in sh_json("artifact", "list", "--run", on_default)]
    assert len(two_uris) == 5 and all(u.startswith(second.as_uri()) for u in two_uris)
    default_store = sh_json("stack", "describe", "default")["components"]["artifact_store"]
    if place == "local":
        assert default_store["config"]["path"] == str(home / "artifacts")
    default_root = Path(default_store["config"]["path"]).as_uri()
    assert len(default_uris) == 5 and all(u.startswith(default_root) for u in default_uris)

    exported = tmp_path / "two.yaml"
    assert "secrets masked" in said("stack", "export", "two", str(exported))
    data = yaml.safe_load(exported.read_text())
    assert data["stack_name"] == "two"
    assert data["components"]["orchestrator"] == {
        "name": "fast",
        "flavor": "local",
        "configuration": {"concurrency": 2},
    }
    fresh = tmp_path / "fresh-home"
    imported = said("stack", "import", str(exported), home=fresh)
    assert "ORCHESTRATOR 'fast': created" in imported
    assert "ARTIFACT_STORE 'second': created" in imported
    original = sh_json("stack", "describe", "two")
    copy = sh_json("stack", "describe", "two", home=fresh)
    assert components_of(copy) == components_of(original)
    assert copy["id"] != original["id"]
    assert [s["name"] for s in sh_json("stack", "list", home=fresh)] == ["default", "two"]
    sh("stack", "set", "two", home=fresh)
    assert run_quickstart(CONVEYOR_HOME=str(fresh)) not in (on_two, on_default)


@runs_pipelines
def test_the_active_stack_is_overridden_per_command_and_per_process(tmp_path: Path) -> None:
    sh("artifact-store", "register", "second", "-f", "local", f"--path={tmp_path / 'a2'}")
    sh("stack", "register", "two", "-o", "default", "-a", "second", "--set")
    by_env = run_quickstart(CONVEYOR_STACK="default")
    by_option = run_quickstart("--stack", "default")
    by_active = run_quickstart()
    assert {r["id"] for r in sh_json("run", "list", "--stack", "default")} == {by_env, by_option}
    assert [r["id"] for r in sh_json("run", "list", "--stack", "two")] == [by_active]
    assert "chosen by $CONVEYOR_STACK" in sh("stack", "get", CONVEYOR_STACK="default")
    result = conveyor_cli("pipeline", "run", QUICKSTART, env={"CONVEYOR_STACK": "tow"})
    assert result.returncode == 1 and "no stack named 'tow' (did you mean: two?)" in result.stderr


@runs_pipelines
def test_runs_keep_their_stack_after_it_is_changed_or_deleted(tmp_path: Path) -> None:
    second = tmp_path / "second"
    sh("artifact-store", "register", "second", "-f", "local", f"--path={second}")
    sh("stack", "register", "two", "-o", "default", "-a", "second")
    run_id = run_quickstart("--stack", "two")

    sh("stack", "update", "two", "-a", "default")
    sh("stack", "rename", "two", "renamed")
    snapshot = sh_json("run", "describe", run_id)["run"]["stack_snapshot"]
    assert snapshot["components"]["artifact_store"]["name"] == "second"
    assert snapshot["components"]["artifact_store"]["config"] == {"path": str(second)}
    assert [r["id"] for r in sh_json("run", "list", "--stack", "renamed")] == [run_id]

    assert "Deleted stack 'renamed'" in said("stack", "delete", "renamed", "-y")
    described = sh_json("run", "describe", run_id)["run"]
    assert (described["stack_name"], described["status"]) == ("two", "completed")
    assert [r["id"] for r in sh_json("run", "list", "--stack", "two")] == [run_id]
    table = sh("run", "describe", run_id)
    assert rows(table)[1][:3] == ["ARTIFACT_STORE", "second", "local"]
    # Its outputs are still read from the store it wrote them to.
    evaluate = next(
        a for a in sh_json("artifact", "list", "--run", run_id) if a["step_name"] == "evaluate"
    )
    assert "'accuracy'" in sh("artifact", "get", evaluate["id"])


@runs_pipelines
def test_run_and_artifact_commands_filter_fetch_and_delete(tmp_path: Path) -> None:
    first = run_quickstart()
    second = run_quickstart()
    assert {r["id"] for r in sh_json("run", "list", "--pipeline", "training_pipeline")} == {
        first,
        second,
    }
    assert sh_json("run", "list", "--pipeline", "other") == []
    assert len(sh_json("run", "list", "--status", "completed")) == 2
    assert sh_json("run", "list", "--status", "failed") == []
    artifact = next(
        a for a in sh_json("artifact", "list", "--run", first) if a["step_name"] == "train"
    )
    described = sh_json("artifact", "describe", artifact["id"][:10])
    assert described["id"] == artifact["id"] and described["ref"]["data_type"] == "numpy.ndarray"
    assert ["step", "train"] in rows(sh("artifact", "describe", artifact["id"]))
    target = tmp_path / "weights.npy"
    assert f"to {target}" in said("artifact", "get", artifact["id"], "--to", str(target))
    assert target.stat().st_size == artifact["ref"]["size"]
    assert f"Deleted run {first}" in said("run", "delete", first, "-y")
    assert [r["id"] for r in sh_json("run", "list")] == [second]
    assert sh_json("artifact", "list", "--run", second) != []
    result = conveyor_cli("run", "describe", first)
    assert result.returncode == 1 and f"no run with id {first!r}" in result.stderr


# --- stack commands and their rules (in-process) ---


def register_two(tmp_path: Path) -> None:
    ok("artifact-store", "register", "second", "-f", "local", f"--path={tmp_path / 'a2'}")
    ok("stack", "register", "two", "-o", "default", "-a", "second")


def stacks_state() -> Any:
    return as_json("stack", "list"), ok("stack", "get", "--output", "json").stdout


def test_register_of_an_existing_stack_name_refuses(tmp_path: Path) -> None:
    register_two(tmp_path)
    before = stacks_state()
    assert "stack 'two' exists already" in refused(
        "stack", "register", "two", "-o", "default", "-a", "default", "--set"
    )
    assert "stack 'default' exists already" in refused("stack", "copy", "two", "default")
    assert "stack 'default' exists already" in refused("stack", "rename", "two", "default")
    assert stacks_state() == before


def test_register_needs_existing_components_of_both_types(tmp_path: Path) -> None:
    before = stacks_state()
    assert "missing: artifact store" in refused("stack", "register", "x", "-o", "default")
    assert "no artifact store named 'defualt' (did you mean: default?)" in refused(
        "stack", "register", "x", "-o", "default", "-a", "defualt"
    )
    assert stacks_state() == before


def test_the_active_stack_cannot_be_deleted(tmp_path: Path) -> None:
    register_two(tmp_path)
    ok("stack", "set", "two")
    before = stacks_state()
    for confirm in (["-y"], []):
        message = refused("stack", "delete", "two", *confirm)
        assert "stack 'two' is the active stack; activate another stack first" in message
        # Refused before any question: there is no answer to give.
        assert "Delete stack" not in message
    assert stacks_state() == before


def test_the_default_stack_cannot_be_deleted(tmp_path: Path) -> None:
    register_two(tmp_path)
    ok("stack", "set", "two")
    before = stacks_state()
    for confirm in (["-y"], []):
        message = refused("stack", "delete", "default", *confirm)
        assert message == "Error: the default stack cannot be deleted"
    assert stacks_state() == before


def test_register_and_update_captions_mark_the_active_stack(tmp_path: Path) -> None:
    ok("artifact-store", "register", "second", "-f", "local", f"--path={tmp_path / 'a2'}")
    registered = ok("stack", "register", "two", "-o", "default", "-a", "second", "--set")
    assert registered.stdout == ""
    assert "'two' stack (ACTIVE)" in registered.stderr
    assert "'two' stack (ACTIVE)" in ok("stack", "describe", "two").stdout
    other = ok("stack", "register", "three", "-o", "default", "-a", "second").stderr
    assert "'three' stack" in other and "(ACTIVE)" not in other
    assert "'two' stack (ACTIVE)" in ok("stack", "update", "two", "-a", "default").stderr
    assert "(ACTIVE)" not in ok("stack", "update", "three", "-a", "default").stderr


def test_a_rabbitmq_stack_on_a_local_store_is_noted_as_one_machine_only(tmp_path: Path) -> None:
    note = "workers on other machines cannot reach it"
    ok("orchestrator", "register", "rmq", "-f", "rabbitmq")
    ok("artifact-store", "register", "here", "-f", "local", f"--path={tmp_path / 'here'}")
    ok("artifact-store", "register", "objects", "-f", "s3", "--bucket", "ml-artifacts")
    registered = " ".join(ok("stack", "register", "prod", "-o", "rmq", "-a", "here").stderr.split())
    assert f"artifact store 'here' is a folder of this machine: {note}" in registered
    assert "docs/scale-out.md" in registered
    assert note in " ".join(ok("stack", "describe", "prod").stdout.split())
    assert note not in json.dumps(as_json("stack", "describe", "prod"))
    # Workers in this process (embedded), or a store every machine reaches: nothing to say.
    assert note not in ok("stack", "register", "solo", "-o", "default", "-a", "here").stderr
    assert note not in ok("stack", "register", "wide", "-o", "rmq", "-a", "objects").stderr
    assert note not in ok("stack", "describe", "solo").stdout


def test_unknown_stack_names_suggest_the_closest(tmp_path: Path) -> None:
    register_two(tmp_path)
    before = stacks_state()
    for command in (
        ["describe", "tow"],
        ["set", "tow"],
        ["delete", "tow", "-y"],
        ["update", "tow", "-a", "default"],
        ["export", "tow", "-"],
        ["copy", "tow", "three"],
    ):
        assert "no stack named 'tow' (did you mean: two?)" in refused("stack", *command)
    assert stacks_state() == before


def test_delete_asks_first_and_keeps_the_components(tmp_path: Path) -> None:
    register_two(tmp_path)
    aborted = runner_input("n\n", "stack", "delete", "two")
    assert aborted.exit_code == 1 and "Delete stack 'two'?" in aborted.stderr
    assert [s["name"] for s in as_json("stack", "list")] == ["default", "two"]
    assert runner_input("y\n", "stack", "delete", "two").exit_code == 0
    assert [s["name"] for s in as_json("stack", "list")] == ["default"]
    assert [c["name"] for c in as_json("artifact-store", "list")] == ["default", "second"]


def runner_input(text: str, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), input=text)


def test_update_rename_copy_and_describe(tmp_path: Path) -> None:
    register_two(tmp_path)
    ok("orchestrator", "register", "fast", "-f", "local")
    assert "nothing to update" in refused("stack", "update", "two")
    ok("stack", "update", "two", "-o", "fast")
    ok("stack", "copy", "two", "three")
    ok("stack", "set", "two")
    ok("stack", "rename", "two", "team")
    assert "The active stack is 'team'" in ok("stack", "get").stdout
    listed = {s["name"]: s for s in as_json("stack", "list")}
    assert listed["team"]["active"] and not listed["three"]["active"]
    assert listed["three"]["components"] == listed["team"]["components"]
    assert listed["three"]["components"]["orchestrator"]["name"] == "fast"
    table = ok("stack", "describe", "three").stdout
    assert "Stack Configuration" in table and "'three' stack" in table
    assert "(ACTIVE)" not in table
    assert rows(table)[:3] == [
        ["COMPONENT_TYPE", "COMPONENT_NAME"],
        ["ARTIFACT_STORE", "second"],
        ["ORCHESTRATOR", "fast"],
    ]
    assert ["concurrency", "4"] in rows(table)  # the flavor's default is shown
    assert "the default stack cannot be renamed" in refused("stack", "rename", "default", "x")


def test_export_to_stdout_and_import_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_two(tmp_path)
    monkeypatch.chdir(tmp_path)
    # As `conveyor stack export two > two.yaml`: the YAML alone on stdout, nothing else.
    exported = ok("stack", "export", "two")
    assert exported.stderr == "" and not Path("two.yaml").exists()
    assert yaml.safe_load(exported.stdout)["stack_name"] == "two"
    Path("two.yaml").write_text(exported.stdout)
    imported = ok("stack", "import", "two.yaml", "--name", "two-again")
    assert imported.stdout == "" and "ARTIFACT_STORE 'second': reused" in imported.stderr
    again = as_json("stack", "describe", "two-again")
    assert components_of(again) == components_of(as_json("stack", "describe", "two"))
    before = stacks_state()
    assert "stack 'two' exists already" in refused("stack", "import", "two.yaml")
    Path("bad.yaml").write_text("stack_name: [unclosed\n")
    assert "cannot read bad.yaml" in refused("stack", "import", "bad.yaml")
    Path("other.yaml").write_text("hello: world\n")
    assert "not a Conveyor stack export" in refused("stack", "import", "other.yaml")
    assert stacks_state() == before


def test_export_redirected_to_its_own_default_file_name_is_valid_yaml(tmp_path: Path) -> None:
    """`conveyor stack export two > two.yaml`, in a shell: once, the YAML went to two.yaml
    and the status line to stdout, that is over the start of the same file."""
    register_two(tmp_path)
    target = tmp_path / "two.yaml"
    with target.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "conveyor.service.cli.app", "stack", "export", "two"],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert yaml.safe_load(target.read_text())["stack_name"] == "two"
    assert "Imported stack 'two-copy'" in said("stack", "import", str(target), "-n", "two-copy")
    assert components_of(as_json("stack", "describe", "two-copy")) == components_of(
        as_json("stack", "describe", "two")
    )


def test_export_and_import_of_unusable_files_are_one_line(tmp_path: Path, place: str) -> None:
    # A server never sends secrets: there --include-secrets is refused before any writing.
    clear = [["--include-secrets"]] if place == "local" else []
    for target in (tmp_path / "missing" / "x.yaml", tmp_path):
        for secrets in ([], *clear):
            message = refused("stack", "export", "default", str(target), *secrets)
            assert message.startswith(f"Error: cannot write {target}: ")
    assert tmp_path.is_dir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    assert refused("stack", "import", str(binary)) == (
        f"Error: cannot read {binary}: not a text file (a stack export is YAML)"
    )
    huge = tmp_path / "huge.yaml"
    huge.write_text("a: " + "x" * (1024 * 1024) + "\n")
    assert f"cannot read {huge}: larger than 1024 KiB" in refused("stack", "import", str(huge))
    assert "cannot read /dev/zero: larger than" in refused("stack", "import", "/dev/zero")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stack_name: [unclosed\n")
    assert refused("stack", "import", str(broken)) == (
        f"Error: cannot read {broken}: not YAML: expected ',' or ']', but got '<stream end>' "
        "at line 2, column 1"
    )
    # The same reading for the processes that take a stack file, which have no store.
    for service in ("worker", "controller"):
        result = conveyor_cli(service, "start", "--stack-file", str(binary))
        assert result.returncode == 1 and result.stderr == (
            f"Error: cannot read {binary}: not a text file (a stack export is YAML)\n"
        )


@local_only("it reads the modes of the home's own SQLite files; a logged-in home has none")
def test_files_that_hold_secrets_are_readable_by_their_owner_only(
    tmp_path: Path, home: Path
) -> None:
    ok("stack", "list")  # creates the home and its store
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    stores = list(home.glob("conveyor.db*"))  # the WAL is gone after a clean close
    assert home / "conveyor.db" in stores
    for path in stores:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    masked, clear = tmp_path / "masked.yaml", tmp_path / "clear.yaml"
    clear.write_text("old contents, world-readable\n")
    clear.chmod(0o644)
    ok("stack", "export", "default", str(masked))
    ok("stack", "export", "default", str(clear), "--include-secrets")
    assert stat.S_IMODE(clear.stat().st_mode) == 0o600
    assert "secrets: included" in clear.read_text()
    assert "secrets: masked" in masked.read_text()


def test_every_command_has_a_one_line_description_and_an_example() -> None:
    def leaves(command: Any, path: list[str]) -> list[tuple[list[str], Any]]:
        children = getattr(command, "commands", None)
        if children is None:
            return [(path, command)]
        return [found for name, c in children.items() for found in leaves(c, [*path, name])]

    commands = leaves(typer.main.get_command(app), [])
    assert len(commands) >= 30
    for path, command in commands:
        text = command.help or ""
        first, _, rest = text.strip().partition("\n\n")
        assert first and "\n" not in first.strip(), path
        assert f"Example: conveyor {' '.join(path)}" in rest, path
        shown = " ".join(cli(*path, "--help").stdout.split())
        assert first.strip() in shown and "Example: conveyor" in shown, path
