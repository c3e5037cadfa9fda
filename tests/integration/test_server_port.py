"""``conveyor server up`` on a port it cannot have: one line, before any banner. (That the
banner names the port it listens on is checked by test_server_process.py, on the server it
starts anyway.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, conveyor_cli


def test_a_busy_port_is_one_line_naming_host_and_port_and_no_banner() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = conveyor_cli("server", "up", "--port", str(port), timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: cannot listen on 127.0.0.1:{port}: the port is in use; choose another with "
        "--port\n"
    )


def test_a_port_out_of_range_is_a_usage_error() -> None:
    result = conveyor_cli("server", "up", "--port", "65536", timeout=30)
    assert result.returncode == 2 and "Invalid value for '--port'" in result.stderr
    assert "Conveyor server on" not in result.stderr + result.stdout


def test_a_pipelines_folder_that_is_not_one_is_a_usage_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file.py"
    a_file.write_text("")
    for folder in (tmp_path / "missing", a_file):
        result = conveyor_cli("server", "up", "--port", "0", "--pipelines", str(folder))
        assert result.returncode == 2 and "Invalid value for '--pipelines'" in result.stderr
        assert "Conveyor server on" not in result.stderr


# The command with the web stack made unimportable: what it refuses before importing it
# (about a second of imports) is refused at once.
_WITHOUT_WEB_STACK = (
    "import sys; sys.modules.update(uvicorn=None, fastapi=None, starlette=None); "
    "from conveyor.service.cli.app import main; main()"
)


def test_a_bad_bind_is_refused_before_the_web_stack_is_imported(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CONVEYOR_HOME": str(tmp_path / "home"),
        "CONVEYOR_ADMIN_TOKEN": "",
        "CONVEYOR_SERVER_TOKEN": "",
    }

    def server_up(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", _WITHOUT_WEB_STACK, "server", "up", *args]
        return subprocess.run(
            command, cwd=ROOT, env={**env, **more}, capture_output=True, text=True, timeout=30
        )

    no_token = server_up("--host", "0.0.0.0")
    assert no_token.returncode == 1
    assert no_token.stderr.startswith("Error: refusing to listen on '0.0.0.0' without a token")
    short = server_up(CONVEYOR_ADMIN_TOKEN="short")
    assert short.returncode == 1 and "has 5 characters" in short.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = server_up("--port", str(port))
    assert busy.returncode == 1 and "the port is in use" in busy.stderr
