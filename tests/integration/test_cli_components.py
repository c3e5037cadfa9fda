"""``conveyor orchestrator ...`` and ``conveyor artifact-store ...`` as a user types them.

In-process through typer's CliRunner (fast), against the test's own CONVEYOR_HOME; what is
asserted is what a user sees: table cells, JSON, messages and exit codes, and that a refused
command changed nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor.contracts import ComponentType
from conveyor.service.cli.app import app
from conveyor.workers.flavors import FLAVORS
from tests.integration.cli_helpers import as_json, ok, refused, rows, runner

# Each test runs against a local store and against a server (tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("place")


def everything() -> Any:
    return (
        as_json("stack", "list"),
        as_json("orchestrator", "list"),
        as_json("artifact-store", "list"),
    )


@pytest.fixture
def nfs(tmp_path: Path) -> Path:
    path = tmp_path / "nfs"
    ok("artifact-store", "register", "nfs", "--flavor", "local", f"--path={path}")
    return path


def test_flavor_list_shows_each_key_with_type_default_and_description() -> None:
    table = ok("orchestrator", "flavor", "list").stdout
    assert ["concurrency", "int", "4", "Steps the embedded worker pool runs at once"] in rows(table)
    assert "orchestrator flavor 'local'" in table
    stores = {f["name"]: f for f in as_json("artifact-store", "flavor", "list")}
    assert set(stores) == {"local", "s3"}
    assert {f["type"] for f in stores.values()} == {"artifact_store"}
    (path,) = stores["local"]["keys"]  # the shape of GET /api/flavors
    assert path["key"] == "path" and path["type"] == "str" and path["required"] is True
    s3 = {key["key"]: key for key in stores["s3"]["keys"]}
    assert s3["bucket"]["required"] is True
    assert {k for k, key in s3.items() if key["secret"]} == {
        "access_key_id",
        "secret_access_key",
        "session_token",
    }
    table = rows(ok("artifact-store", "flavor", "list").stdout)
    assert table[0] == ["KEY", "TYPE", "DEFAULT", "DESCRIPTION"]
    assert ["path", "str", "(required)"] in [row[:3] for row in table]
    assert ["bucket", "str", "(required)"] in [row[:3] for row in table]


def test_register_describe_update_rename_delete(nfs: Path) -> None:
    listed = as_json("artifact-store", "list")
    assert [(c["name"], c["flavor"], c["active"]) for c in listed] == [
        ("default", "local", True),
        ("nfs", "local", False),
    ]
    described = as_json("artifact-store", "describe", "nfs")
    assert described["config"] == {"path": str(nfs)} and described["stacks"] == []
    table = ok("artifact-store", "describe", "nfs").stdout
    assert ["path", str(nfs)] in rows(table) and ["FLAVOR", "local"] in rows(table)
    assert "ARTIFACT_STORE 'nfs'" in table

    ok("artifact-store", "update", "nfs", "--path", str(nfs / "v2"))
    assert as_json("artifact-store", "describe", "nfs")["config"] == {"path": str(nfs / "v2")}
    ok("artifact-store", "rename", "nfs", "shared")
    assert [c["name"] for c in as_json("artifact-store", "list")] == ["default", "shared"]
    deleted = ok("artifact-store", "delete", "shared", "-y")
    assert "Deleted artifact store 'shared'" in deleted.stderr and deleted.stdout == ""
    assert [c["name"] for c in as_json("artifact-store", "list")] == ["default"]


def test_values_are_json_when_they_parse_and_text_for_text_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the folder a server runs in: a relative path is of the folder it is typed in.
    monkeypatch.chdir(tmp_path)
    ok("orchestrator", "register", "fast", "-f", "local", "--concurrency=8")
    # max_active_runs follows concurrency unless set: twice it.
    described = as_json("orchestrator", "describe", "fast")["config"]
    assert described == {"concurrency": 8, "max_active_runs": 16}
    ok("artifact-store", "register", "numbers", "-f", "local", "--path=2024")
    # Text, not the number 2024; and made absolute, as a relative path would drift.
    expected = str(Path("2024").resolve())
    assert as_json("artifact-store", "describe", "numbers")["config"] == {"path": expected}
    ok("orchestrator", "update", "fast", "--concurrency=null")
    assert as_json("orchestrator", "describe", "fast")["config"] == {
        "concurrency": 4,
        "max_active_runs": 8,
    }
    assert "give configuration as --key=value" in refused(
        "orchestrator", "update", "fast", "-c", "3"
    )


def test_list_marks_the_components_of_the_active_stack(nfs: Path) -> None:
    ok("orchestrator", "register", "fast", "-f", "local")
    ok("stack", "register", "two", "-o", "fast", "-a", "nfs")
    marked = {r[1]: r[0] for r in rows(ok("orchestrator", "list").stdout)[1:]}
    assert marked == {"default": "👉", "fast": ""}
    ok("stack", "set", "two")
    table = rows(ok("orchestrator", "list").stdout)
    assert [r[0] for r in table] == ["ACTIVE", "", "👉"]
    assert table[0] == ["ACTIVE", "NAME", "COMPONENT ID", "FLAVOR", "SHARED", "OWNER"]
    assert table[2][1:4:2] == ["fast", "local"]
    assert [c["active"] for c in as_json("artifact-store", "list", "--stack", "default")] == [
        True,
        False,
    ]
    assert as_json("orchestrator", "describe", "fast")["stacks"] == ["two"]


# --- the rules, each refused with exit 1, a clear message, nothing changed ---


def test_register_of_an_existing_name_refuses(nfs: Path) -> None:
    before = everything()
    message = refused("artifact-store", "register", "nfs", "-f", "local", "--path=/elsewhere")
    assert "artifact store 'nfs' exists already" in message
    assert everything() == before
    assert as_json("artifact-store", "describe", "nfs")["config"] == {"path": str(nfs)}


def test_rename_to_an_existing_name_refuses(nfs: Path) -> None:
    before = everything()
    assert "artifact store 'default' exists already" in refused(
        "artifact-store", "rename", "nfs", "default"
    )
    assert everything() == before


def test_component_used_by_stacks_cannot_be_deleted(nfs: Path) -> None:
    # Components of the test's own: on a server, the default ones are the admin's, and a
    # member is told that first.
    ok("orchestrator", "register", "fast", "-f", "local")
    ok("stack", "register", "a", "-o", "fast", "-a", "nfs")
    ok("stack", "register", "b", "-o", "fast", "-a", "nfs")
    before = everything()
    for confirm in (["-y"], []):
        message = refused("artifact-store", "delete", "nfs", *confirm)
        assert "artifact store 'nfs' is used by stacks 'a', 'b'" in message
        # Refused before any question: there is no answer to give.
        assert "Delete artifact store" not in message
        assert "orchestrator 'fast' is used by stacks 'a', 'b'" in refused(
            "orchestrator", "delete", "fast", *confirm
        )
    assert everything() == before


@pytest.mark.parametrize(
    ("group", "kind", "kept"),
    [
        ("orchestrator", "orchestrator", "Past runs keep its configuration."),
        ("artifact-store", "artifact store", "The artifacts in it are kept."),
    ],
)
def test_delete_asks_first_as_stack_delete_does(
    nfs: Path, group: str, kind: str, kept: str
) -> None:
    ok(group, "register", "spare", "-f", "local", *([f"--path={nfs}"] if "store" in group else []))
    before = everything()
    # No, and no answer at all (a script without a terminal): nothing is deleted.
    for answer in ("n\n", ""):
        aborted = runner.invoke(app, [group, "delete", "spare"], input=answer)
        assert aborted.exit_code == 1
        assert f"Delete {kind} 'spare'? {kept} [y/N]:" in aborted.stderr
        assert "Deleted" not in aborted.stderr
    assert everything() == before
    asked = runner.invoke(app, [group, "delete", "spare"], input="y\n")
    assert asked.exit_code == 0 and f"Deleted {kind} 'spare'" in asked.stderr
    assert "spare" not in [c["name"] for c in as_json(group, "list")]
    ok(group, "register", "spare", "-f", "local", *([f"--path={nfs}"] if "store" in group else []))
    unasked = ok(group, "delete", "spare", "--yes")
    assert "Delete " not in unasked.stderr and f"Deleted {kind} 'spare'" in unasked.stderr


def test_every_delete_takes_the_same_yes_flag() -> None:
    for command in (
        ["stack"],
        ["orchestrator"],
        ["artifact-store"],
        ["run"],
        ["user"],
    ):
        text = " ".join(ok(*command, "delete", "--help").stdout.split())
        assert "-y, --yes Do not ask for confirmation" in text, command


def test_unknown_key_lists_the_valid_keys(nfs: Path) -> None:
    before = everything()
    message = refused("orchestrator", "register", "x", "-f", "local", "--concurency=2")
    assert "unknown key 'concurency' (valid keys: concurrency, max_active_runs)" in message
    # The test's own store: on a server, the default one is the admin's (told first).
    assert "(valid keys: path)" in refused("artifact-store", "update", "nfs", "--root=/x")
    assert everything() == before


def test_wrong_type_says_which_key_and_what_was_expected() -> None:
    ok("orchestrator", "register", "fast", "-f", "local", "--concurrency=2")
    before = everything()
    message = refused("orchestrator", "update", "fast", "--concurrency=lots")
    assert "key 'concurrency' expects int" in message and "(got 'lots')" in message
    assert "key 'concurrency' expects int" in refused(
        "orchestrator", "register", "slow", "-f", "local", "--concurrency=[1]"
    )
    assert everything() == before
    described = as_json("orchestrator", "describe", "fast")["config"]
    assert described == {"concurrency": 2, "max_active_runs": 4}


def test_unknown_flavor_and_unknown_name_suggest(nfs: Path) -> None:
    before = everything()
    assert "unknown orchestrator flavor 'lcoal' (available: local" in refused(
        "orchestrator", "register", "x", "-f", "lcoal"
    )
    assert "no artifact store named 'nsf' (did you mean: nfs?)" in refused(
        "artifact-store", "describe", "nsf"
    )
    assert "no orchestrator named 'defualt' (did you mean: default?)" in refused(
        "orchestrator", "update", "defualt", "--concurrency=2"
    )
    assert "did you mean: nfs?" in refused("artifact-store", "delete", "nfx")
    assert everything() == before


@pytest.mark.skipif(
    (ComponentType.ORCHESTRATOR, "rabbitmq") not in FLAVORS, reason="no rabbitmq flavor"
)
def test_a_secret_never_shows_in_describe_list_or_export(place: str) -> None:
    url = "amqp://bob:s3cret-pw@mq.example:5672/prod"
    registered = ok("orchestrator", "register", "mq", "-f", "rabbitmq", f"--url={url}")
    ok("stack", "register", "remote", "-o", "mq", "-a", "default")
    shown = [
        registered.stderr,
        ok("orchestrator", "describe", "mq").stdout,
        ok("orchestrator", "describe", "mq", "--output", "json").stdout,
        ok("orchestrator", "list", "--output", "json").stdout,
        ok("stack", "describe", "remote").stdout,
        ok("stack", "list", "--output", "json").stdout,
        ok("stack", "describe", "remote", "--output", "json").stdout,
        ok("stack", "export", "remote", "-").stdout,
    ]
    for output in shown:
        assert "s3cret-pw" not in output
    assert as_json("orchestrator", "describe", "mq")["config"]["url"] == (
        "amqp://bob:****@mq.example:5672/prod"
    )
    if place == "server":  # a server never sends a secret, not even to its owner
        message = refused("stack", "export", "remote", "-", "--include-secrets")
        assert "a server never sends secrets" in message
        return
    clear = ok("stack", "export", "remote", "-", "--include-secrets").stdout
    assert "s3cret-pw" in clear


def test_every_component_command_has_a_one_line_help_with_an_example() -> None:
    for group in ("orchestrator", "artifact-store"):
        for command in ("list", "register", "describe", "update", "rename", "delete"):
            text = ok(group, command, "--help").stdout
            assert f"Example: conveyor {group} {command}" in " ".join(text.split())
        assert (
            f"Example: conveyor {group} flavor list" in ok(group, "flavor", "list", "--help").stdout
        )


def test_a_broker_url_that_is_not_amqp_is_refused_at_registration() -> None:
    before = as_json("orchestrator", "list")
    message = refused("orchestrator", "register", "mq", "-f", "rabbitmq", "--url", "http://x")
    assert "key 'url'" in message and "must be an amqp:// or amqps:// URL" in message
    ok("orchestrator", "register", "mq", "-f", "rabbitmq", "--url", "amqp://mq.example/")
    assert "must name the broker's host" in refused(
        "orchestrator", "update", "mq", "--url", "amqp://bob:pw@/"
    )
    assert len(as_json("orchestrator", "list")) == len(before) + 1


def test_a_bare_key_that_is_not_yes_or_no_needs_a_value() -> None:
    before = as_json("orchestrator", "list")
    message = refused("orchestrator", "register", "fast", "-f", "local", "--concurrency")
    assert message == "Error: --concurrency needs a value: --concurrency=VALUE"
    assert as_json("orchestrator", "list") == before
