"""``conveyor server up`` on a port it cannot have: one line, before any banner. (That the
banner names the port it listens on is checked by test_server_process.py, on the server it
starts anyway.)"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import conveyor_cli


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
