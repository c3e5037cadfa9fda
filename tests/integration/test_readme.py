"""The README's tour works as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_tour_snippet_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    first_python_block = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    script = tmp_path / "tour.py"
    script.write_text(first_python_block)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "completed 90"


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.findall(r"```bash\n(.*?)```", readme, re.S)[0].splitlines()
    assert first_block == [
        "pip install -e . && conveyor pipeline run examples/quickstart.py:training_pipeline",
        "pip install -q -e '.[dev]' && python -m pytest",
    ]
