"""Running a notebook headless, as Jupyter would, on a kernel of this venv's Python.

The kernelspec is written into a temporary folder on ``JUPYTER_PATH``, so the test uses
neither the machine's kernels nor its Jupyter configuration.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from nbclient import NotebookClient

KERNEL = "conveyor-test"
ANSI_ESCAPE = re.compile(r"\x1b\[|\x1b\]|\x1b")


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a kernel that runs this venv's Python, registered for this test only."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel_json = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel_json))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # else jupyter_core warns on import
    # Kernels run without asyncio debug, as a user's do.
    monkeypatch.delenv("PYTHONASYNCIODEBUG", raising=False)
    return KERNEL


def run_notebook(
    kernel: str,
    folder: Path,
    cells: list[str],
    *,
    while_running: Callable[[NotebookClient], None] | None = None,
) -> Any:
    """The notebook of ``cells`` as executed in ``folder`` (its working directory); a cell
    that raises keeps its error output and the next cells still run. ``while_running`` is
    called in another thread while the cells run (to interrupt the kernel, say)."""
    import nbformat
    from nbclient import NotebookClient  # here: jupyter_core warns if imported before `kernel`

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in cells]
    )
    client = NotebookClient(
        notebook,
        kernel_name=kernel,
        timeout=90,
        allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )
    if while_running is None:
        client.execute()
    else:
        asyncio.run(_execute_while(client, while_running))
    (folder / "executed.ipynb").write_text(nbformat.writes(notebook))
    return notebook


async def _execute_while(
    client: NotebookClient, while_running: Callable[[NotebookClient], None]
) -> None:
    # On a loop that asyncio.run closes: nbclient's sync execute() in another thread
    # leaves that thread's loop and sockets for the garbage collector.
    executing = asyncio.create_task(client.async_execute())
    await asyncio.to_thread(while_running, client)
    await executing


def printed(cell: Any) -> str:
    """What a cell printed (stdout and stderr), as the notebook shows it."""
    return "".join(
        output.get("text", "") for output in cell.outputs if output.output_type == "stream"
    )


def error_of(cell: Any) -> tuple[str, str] | None:
    """(exception name, message) of the exception a cell raised, or None."""
    for output in cell.outputs:
        if output.output_type == "error":
            return output.ename, output.evalue
    return None


def shown_text(cell: Any) -> str:
    """Every text a cell shows but the traceback of an error, which Jupyter colours itself
    (IPython sends it with terminal escapes that every front end turns into colours)."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts.extend([output.ename, output.evalue])
        else:
            parts.extend(str(value) for value in output.get("data", {}).values())
    return "".join(parts)
