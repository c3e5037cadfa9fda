"""A pipeline's parameters checked against its signature, before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pydantic
import pytest

from conveyor import pipeline, step
from conveyor.contracts import ValidationError
from conveyor.service.pipeline_parameters import ParameterError, PipelineParameters, type_name


@step
def train(epochs: int, rate: float) -> float:
    return epochs * rate


@pipeline
def training(epochs: int = 300, rate: float = 0.1, mode: Literal["fast", "slow"] = "fast") -> None:
    train(epochs=epochs, rate=rate)


class Window(pydantic.BaseModel):
    start: int
    end: int


def typed(
    name: str, sizes: list[int], window: Window, shape: tuple[int, int] = (1, 2), *, seed: int
) -> None:
    pass


def anything(a, b=1):  # type: ignore[no-untyped-def]
    pass


def refused(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ParameterError) as caught:
        PipelineParameters("p", fn).bind(args, kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_a_wrong_type_names_the_parameter_the_type_and_the_value() -> None:
    message = refused(training.fn, epochs="abc")
    assert message.startswith("pipeline 'p': parameter 'epochs' expects int, got 'abc'")
    assert "valid integer" in message


def test_every_wrong_parameter_is_named_at_once() -> None:
    message = refused(training.fn, epochs="abc", rate="fast", mode="medium")
    assert "'epochs' expects int" in message
    assert "'rate' expects float" in message
    assert "'mode' expects Literal['fast', 'slow'], got 'medium'" in message


def test_an_unknown_parameter_suggests_the_close_ones() -> None:
    assert refused(training.fn, epoch=3) == (
        "pipeline 'p': no parameter 'epoch'; did you mean 'epochs'?"
    )
    assert refused(training.fn, colour=3) == (
        "pipeline 'p': no parameter 'colour' (its parameters: epochs, rate, mode)"
    )


def test_missing_required_parameters_are_named_with_their_types() -> None:
    message = refused(typed, "n", [1])
    assert "missing parameter 'window' (Window)" in message
    assert "missing parameter 'seed' (int)" in message
    assert "sizes" not in message and "'name'" not in message


def test_values_are_validated_and_handed_on_in_json_form() -> None:
    bound = PipelineParameters("p", typed).bind(
        ("n",), {"sizes": ["1", 2], "window": {"start": 1, "end": "2"}, "seed": 7}
    )
    assert bound.arguments == {
        "name": "n",
        "sizes": [1, 2],
        "window": {"start": 1, "end": 2},
        "shape": (1, 2),  # a default, as written
        "seed": 7,
    }


def test_defaults_are_taken_as_written_and_given_values_are_checked() -> None:
    def sloppy(limit: int = None, ratio: float = 1) -> None:  # type: ignore[assignment]  # noqa: RUF013
        pass

    assert PipelineParameters("p", sloppy).bind((), {}).arguments == {"limit": None, "ratio": 1}
    assert "'limit' expects int, got None" in refused(sloppy, limit=None)


def test_a_nested_error_says_where() -> None:
    message = refused(typed, "n", [1, "x"], {"start": 1, "end": 2}, seed=1)
    assert "'sizes' expects list[int], got [1, 'x'] at 1:" in message


def test_unannotated_parameters_take_anything_and_defaults_apply() -> None:
    bound = PipelineParameters("p", anything).bind((), {"a": {"k": [1, None]}})
    assert bound.arguments == {"a": {"k": [1, None]}, "b": 1}
    assert "missing parameter 'a'" in refused(anything)


def test_a_value_json_cannot_carry_is_refused_by_name() -> None:
    @pipeline
    def calls(fn: Callable[[], int]) -> None:
        train(epochs=1, rate=1.0)

    with pytest.raises(ValidationError, match="parameter 'fn' must be JSON-compatible"):
        calls.compile(fn=lambda: 1)


def test_a_huge_value_is_quoted_short() -> None:
    message = refused(training.fn, epochs="9" * 10_000 + "x")
    assert len(message) < 400 and "…" in message


def test_text_from_the_command_line_becomes_the_type_the_parameter_wants() -> None:
    parameters = PipelineParameters("p", typed)
    values = parameters.from_text(
        {"name": "100", "sizes": "[1, 2]", "seed": "7", "window": '{"start": 1, "end": 2}'}
    )
    assert values == {"name": "100", "sizes": [1, 2], "seed": 7, "window": {"start": 1, "end": 2}}
    assert PipelineParameters("p", training.fn).from_text({"epochs": "abc", "other": "1"}) == {
        "epochs": "abc",  # refused by bind, with the text the user typed
        "other": 1,
    }
    assert PipelineParameters("p", anything).from_text({"a": "null", "b": "x y"}) == {
        "a": None,
        "b": "x y",
    }


def test_type_names_read_as_written() -> None:
    assert type_name(int) == "int"
    assert type_name(list[int]) == "list[int]"
    assert type_name(int | None) == "int | None"
    assert type_name(dict[str, list[Window]]) == "dict[str, list[Window]]"


def test_compiling_and_calling_refuse_bad_parameters_before_any_step_runs() -> None:
    with pytest.raises(ParameterError, match="'epochs' expects int"):
        training.compile(epochs="abc")
    with pytest.raises(ParameterError, match="'epochs' expects int"):
        training(epochs="abc")  # refused before a run is submitted
    spec, _ = training.compile(epochs="12")
    assert spec.parameters == {"epochs": 12, "rate": 0.1, "mode": "fast"}
    assert spec.steps[0].parameters == {"epochs": 12, "rate": 0.1}
