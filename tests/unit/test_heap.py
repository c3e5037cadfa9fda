"""The collector settings of Conveyor's service processes (in a child: they are global)."""

from __future__ import annotations

import subprocess
import sys

from conveyor.workers.heap import YOUNG_THRESHOLD


def test_a_started_process_freezes_what_it_holds_and_collects_young_objects_less_often() -> None:
    code = (
        "import gc\n"
        "import conveyor.workers.runtime  # what a worker holds\n"
        "from conveyor.workers.heap import settle_after_start\n"
        "before = gc.get_threshold()\n"
        "settle_after_start()\n"
        "print(gc.get_freeze_count(), *gc.get_threshold(), *before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    frozen, young, middle, old, _, middle_before, old_before = map(int, out)
    assert frozen > 20_000  # a worker's modules: never garbage, never walked again
    assert young == YOUNG_THRESHOLD
    assert (middle, old) == (middle_before, old_before)
