"""Compiling pipelines into DAGs, output names, and references."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import pipeline, step
from conveyor.contracts import ConveyorError, OutputSelector, ValidationError
from conveyor.service.pipelines import load_pipeline
from conveyor.workers.steps import (
    FILE_MODULE_PREFIX,
    load_reference,
    output_names,
    readable,
    reference_of,
)


@step
def source(n: int = 3) -> list[int]:
    return list(range(n))


@step
def work(xs: list[int], i: int) -> int:
    return xs[i] * 2


@step
def join(parts: list[int]) -> int:
    return sum(parts)


@step
def pair() -> tuple[int, str]:
    return 1, "one"


@step
def sink(x: int) -> None:
    pass


@pipeline
def fan(n: int = 3) -> None:
    xs = source(n=n)
    join([work(xs, i) for i in range(n)])


def test_output_names_follow_the_annotation() -> None:
    assert output_names(source.fn) == ["output"]
    assert output_names(pair.fn) == ["output_0", "output_1"]
    assert output_names(sink.fn) == []
    assert output_names(lambda: 1) == ["output"]


def test_fan_out_and_fan_in_compile() -> None:
    spec, definitions = fan.compile(n=4)
    names = [s.name for s in spec.steps]
    assert names == ["source", "work", "work_2", "work_3", "work_4", "join"]
    assert spec.parameters == {"n": 4}
    joined = spec.steps[-1]
    assert joined.inputs["parts"] == [OutputSelector(step=n, output="output") for n in names[1:5]]
    assert spec.steps[2].parameters == {"i": 1}
    assert spec.steps[0].parameters == {"n": 4}
    assert set(definitions) == {source.ref, work.ref, join.ref}


def test_several_outputs_are_separate_handles() -> None:
    @pipeline
    def p() -> None:
        number, _word = pair()
        sink(number)

    spec, _ = p.compile()
    assert spec.steps[1].inputs["x"] == OutputSelector(step="pair", output="output_0")


def test_step_called_outside_a_pipeline_runs_its_body() -> None:
    assert work([1, 2], 1) == 4


def test_non_json_parameters_are_refused() -> None:
    @pipeline
    def p() -> None:
        work(object(), 1)

    with pytest.raises(ValidationError, match="'xs' must be JSON-compatible"):
        p.compile()


def test_wrong_arguments_name_the_step() -> None:
    @pipeline
    def p() -> None:
        work(1, 2, 3)

    with pytest.raises(ValidationError, match="step 'work'"):
        p.compile()


def test_branching_on_an_output_while_building_is_an_error() -> None:
    @pipeline
    def p() -> None:
        if source():
            sink(1)

    with pytest.raises(ConveyorError, match="branch inside a step"):
        p.compile()


def test_references_import_by_module_and_by_file(tmp_path: Path) -> None:
    assert load_reference(reference_of(source.fn)) is source
    script = tmp_path / "mine.py"
    script.write_text("from conveyor import step\n@step\ndef hello() -> str:\n    return 'hi'\n")
    loaded = load_reference(f"{script}:hello")
    assert loaded.fn() == "hi"
    assert reference_of(loaded.fn) == f"{script}:hello"


def test_a_scripts_reference_follows_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script's path is resolved once, but shown from wherever the process is now."""
    script = tmp_path / "mine.py"
    script.write_text("from conveyor import step\n@step\ndef hello() -> str:\n    return 'hi'\n")
    loaded = load_reference(f"{script}:hello")
    assert reference_of(loaded.fn) == f"{script}:hello"
    monkeypatch.chdir(tmp_path)
    assert reference_of(loaded.fn) == "mine.py:hello"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert reference_of(loaded.fn) == f"{script}:hello"


@pytest.mark.parametrize("ref", ["nope", "no_such_module_xyz:f", "tests:missing_name", "x.py:f"])
def test_bad_references_say_what_is_wrong(ref: str) -> None:
    with pytest.raises(ConveyorError, match=r"not a reference|cannot import|has no name"):
        load_reference(ref)


PIPELINES_FILE = """
from conveyor import pipeline, step

class Report:
    pass

@step
def fit() -> int:
    return 1

@pipeline
def training() -> None:
    fit()

@pipeline
def train_quick() -> None:
    fit()
"""


def test_a_mistyped_pipeline_name_suggests_the_close_ones(tmp_path: Path) -> None:
    script = tmp_path / "mine.py"
    script.write_text(PIPELINES_FILE)
    with pytest.raises(ConveyorError) as caught:
        load_pipeline(f"{script}:trainig")
    assert str(caught.value) == (
        f"{script} has no pipeline 'trainig'; did you mean 'training' or 'train_quick'?"
    )
    with pytest.raises(ConveyorError) as caught:
        load_pipeline(f"{script}:evaluate")
    assert str(caught.value).endswith("has no pipeline 'evaluate' (it has: training, train_quick)")
    with pytest.raises(ConveyorError, match=r"no pipeline 'fitt' \(it has: training, train_q"):
        load_pipeline(f"{script}:fitt")  # a step is not offered for a pipeline


def test_messages_name_the_users_file_not_a_generated_module(tmp_path: Path) -> None:
    script = tmp_path / "mine.py"
    script.write_text(PIPELINES_FILE)
    report = load_reference(f"{script}:Report")
    generated = report.__module__
    assert generated.startswith(FILE_MODULE_PREFIX)
    assert readable(f"module {generated!r} has no attribute 'x'") == (
        f"module '{script}' has no attribute 'x'"
    )
    assert readable(f"a {generated}.Report, which") == f"a {script}:Report, which"
    assert readable(f"{FILE_MODULE_PREFIX}0000_unknown stays") == (
        f"{FILE_MODULE_PREFIX}0000_unknown stays"
    )


def test_a_pipeline_compiled_again_sees_a_helper_redefined_since() -> None:
    """A step's StepSpec fields are kept from one compile to the next, but not its code
    digest: a notebook cell run again changes what the step runs."""
    from tests.unit.test_notebook_code import cells

    notebook = cells(
        "from conveyor import pipeline, step\n",
        "def helper(x):\n    return x + 1\n",
        "@step(retries=2)\ndef work(x: int) -> int:\n    return helper(x)\n",
        "@pipeline\ndef p() -> None:\n    work(1)\n",
    )
    first = notebook["p"].compile()[0].steps[0]
    assert notebook["p"].compile()[0].steps[0] == first
    again = cells("def helper(x):\n    return x + 2\n")["helper"]
    notebook["helper"] = again
    second = notebook["p"].compile()[0].steps[0]
    assert second.code_digest != first.code_digest
    assert (second.retries, second.ref, second.name) == (2, first.ref, "work")
