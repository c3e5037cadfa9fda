"""The module that carries steps typed into notebook cells to remote workers."""

from __future__ import annotations

import linecache
from typing import Any

import pytest

from conveyor.contracts import ConveyorError
from conveyor.workers.notebook_code import cell_module
from conveyor.workers.steps import StepDefinition

INSTALLED = frozenset({"conveyor"})


def cells(*sources: str) -> dict[str, Any]:
    """The globals of a notebook that ran ``sources``, one cell each, as IPython runs them
    (each cell's text in linecache under a file name that does not exist)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for number, source in enumerate(sources):
        filename = f"<ipython-input-{number}-test>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)
    return namespace


def steps_of(namespace: dict[str, Any], *names: str) -> list[StepDefinition]:
    return [namespace[name] for name in names]


def test_the_module_has_the_steps_and_what_they_use_and_no_more() -> None:
    notebook = cells(
        "import json\nimport os.path as osp\nfrom conveyor import step\nLIMIT = (1, 'a')\n"
        "UNUSED = 5\n",
        "def helper(x):\n    return osp.join(str(x), json.dumps(LIMIT))\n",
        "@step(retries=1)\ndef first(x: int) -> str:\n    return helper(x)\n",
    )
    module = cell_module(steps_of(notebook, "first"), notebook, INSTALLED)
    assert module.source == (
        "# Written by Conveyor from notebook cells: a run's steps and what they use.\n"
        "\n"
        "from conveyor.workers.steps import step\n"
        "import json\n"
        "import posixpath as osp\n"  # what os.path is
        "\n"
        "LIMIT = (1, 'a')\n"
        "\n"
        "\n"
        "def helper(x):\n"
        "    return osp.join(str(x), json.dumps(LIMIT))\n"
        "\n"
        "\n"
        "@step(retries=1)\n"
        "def first(x: int) -> str:\n"
        "    return helper(x)\n"
    )
    again = cell_module(steps_of(notebook, "first"), notebook, INSTALLED)
    assert again.digest == module.digest


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "from conveyor import step\nclass Model:\n    pass\nmodel = Model()\n"
            "@step\ndef s() -> str:\n    return str(model)\n",
            "step 's' uses the notebook's 'model' (of type Model), which cannot travel",
        ),
        (
            "from conveyor import step\nclass Model:\n    pass\n"
            "@step\ndef s() -> str:\n    return Model.__name__\n",
            "step 's' uses the class 'Model', typed into a cell",
        ),
        (
            "from conveyor import step\nimport tests.unit.test_notebook_code as local\n"
            "@step\ndef s() -> str:\n    return str(local)\n",
            "step 's' uses 'local' from 'tests.unit.test_notebook_code', a module of a local "
            "folder",
        ),
        (
            "from conveyor import step\ndef retried(f):\n    return step(retries=2)(f)\n"
            "@retried\ndef s() -> int:\n    return 1\n",
            None,  # a decorator typed into a cell comes along, before the step
        ),
        (
            "from conveyor import step\nimport functools\n"
            "@functools.lru_cache\ndef cached(x):\n    return x\n"
            "@step\ndef s() -> int:\n    return cached(1)\n",
            "step 's' uses the notebook's 'cached' (of type _lru_cache_wrapper)",
        ),
        (
            "from conveyor import step\ndef s() -> int:\n    return 1\ns = step(s)\n",
            "step 's' is not made by a @step decorator on its def",
        ),
        (
            "from conveyor import step\n@step\ndef s() -> int:\n    return missing_name\n"
            "missing_name = print\n",
            None,  # a builtin's alias is an importable name: it travels
        ),
    ],
)
def test_what_cannot_travel_is_refused_by_name(source: str, message: str | None) -> None:
    notebook = cells(source)
    if message is None:
        cell_module(steps_of(notebook, "s"), notebook, INSTALLED)
        return
    with pytest.raises(ConveyorError) as refused:
        cell_module(steps_of(notebook, "s"), notebook, INSTALLED)
    assert message in str(refused.value)


def test_a_step_defined_again_after_the_pipeline_took_it_is_refused() -> None:
    notebook = cells("from conveyor import step\n@step\ndef s() -> int:\n    return 1\n")
    old = notebook["s"]
    notebook.update(cells("from conveyor import step\n@step\ndef s() -> int:\n    return 2\n"))
    with pytest.raises(ConveyorError, match="step 's' is not the notebook's 's'"):
        cell_module([old], notebook, INSTALLED)
