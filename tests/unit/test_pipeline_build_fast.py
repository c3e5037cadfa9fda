"""The compiler's fast path (arguments bound without ``Signature.bind``, StepSpecs built
from a template checked once) gives what full validation gives, and refuses what it did."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from conveyor import pipeline, step
from conveyor.contracts import OutputSelector, PipelineSpec, StepSpec, ValidationError
from conveyor.contracts.models import prevalidated
from conveyor.service.pipelines import _Shape


@step(retries=2, timeout=5, pool="gpu", trust=["numpy.float64"])
def combine(a: int, b: int, *, scale: float = 1.0, label: str = "x") -> int:
    return int((a + b) * scale)


@step
def source() -> int:
    return 1


@step
def source_2() -> int:  # the name the second call of ``source`` gets
    return 2


@step
def gather(xs: list[int], extra: int = 0) -> int:
    return sum(xs) + extra


@pipeline
def mixed(n: int = 3) -> None:
    a = source()
    b = source()
    parts = [combine(b=a, a=b, label="z"), combine(a, 2, scale=0.5), combine(1, b=b)]
    gather(parts, extra=n)


def test_a_compiled_spec_equals_its_validated_round_trip() -> None:
    spec, _ = mixed.compile(n=4)
    again = PipelineSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert [s.name for s in spec.steps] == [
        "source", "source_2", "combine", "combine_2", "combine_3", "gather",
    ]  # fmt: skip
    first = spec.steps[2]
    # Keyword arguments land in signature order, as Signature.bind orders them.
    assert list(first.inputs) == ["a", "b"]
    assert first.inputs["a"] == OutputSelector(step="source_2", output="output")
    assert first.parameters == {"label": "z"}
    assert (first.retries, first.timeout_s, first.pool, first.trust) == (
        2, 5.0, "gpu", ["numpy.float64"],
    )  # fmt: skip
    assert spec.steps[5].parameters == {"extra": 4}


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1, 2), {}),
    ((1,), {"b": 2}),
    ((), {"b": 2, "a": 1, "label": "q"}),
    ((1, 2), {"scale": 2.0}),
    ((1, 2, 3), {}),  # too many positional: scale is keyword-only
    ((1,), {}),  # b missing
    ((1, 2), {"a": 1}),  # a twice
    ((1, 2), {"colour": 1}),  # unknown
    ((), {}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_fast_binding_agrees_with_signature_bind(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    fast = _Shape(combine).bind(args, kwargs)
    try:
        expected = combine.signature.bind(*args, **kwargs).arguments
    except TypeError:
        assert fast is None  # the slow path raises Signature.bind's own message
    else:
        # None would only mean "ask Signature.bind"; these are all simple calls.
        assert fast == dict(expected)
        assert list(fast) == list(expected)


def test_var_arguments_take_the_slow_path_and_are_refused() -> None:
    @step
    def star(*xs: int) -> int:
        return sum(xs)

    @pipeline
    def uses_star() -> None:
        star(1, 2)

    assert _Shape(star).bind((1, 2), {}) is None
    with pytest.raises(ValidationError, match=r"\*args and \*\*kwargs are not supported"):
        uses_star.compile()


def test_wrong_arguments_are_refused_with_the_signatures_message() -> None:
    @pipeline
    def wrong() -> None:
        combine(1, 2, 3)

    with pytest.raises(ValidationError, match="step 'combine': too many positional"):
        wrong.compile()


def test_a_generated_name_that_another_step_has_is_refused() -> None:
    @pipeline
    def clash() -> None:
        source_2()
        source()
        source()  # would be named source_2

    with pytest.raises(ValidationError, match="two steps are named 'source_2'"):
        clash.compile()


def test_an_output_of_another_pipeline_build_is_refused() -> None:
    kept: list[Any] = []

    @pipeline
    def first() -> None:
        kept.append(source())

    @pipeline
    def second() -> None:
        gather([kept[0]])

    first.compile()
    with pytest.raises(ValidationError, match="which no earlier step of the pipeline has"):
        second.compile()


def test_a_step_name_too_long_is_refused_as_before() -> None:
    @step(name="s" * 200)
    def long_named() -> int:
        return 1

    @pipeline
    def twice() -> None:
        long_named()
        long_named()  # "s" * 200 + "_2": over the bound

    with pytest.raises(ValueError, match="at most 200 characters"):
        twice.compile()


def test_prevalidated_models_equal_validated_ones() -> None:
    values = dict(StepSpec(name="a", ref="m:a", outputs=["output"]))
    fields = {"name", "ref", "outputs"}
    made = prevalidated(StepSpec, values, fields)
    assert made == StepSpec(name="a", ref="m:a", outputs=["output"])
    assert (
        made.model_dump_json()
        == StepSpec(name="a", ref="m:a", outputs=["output"]).model_dump_json()
    )
    assert made.model_fields_set == fields
    with pytest.raises(Exception, match="frozen"):
        made.name = "b"  # type: ignore[misc]


def test_the_collector_is_back_on_after_a_build_that_raised() -> None:
    import gc

    @pipeline
    def raises() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        raises.compile()
    assert gc.isenabled()
    assert inspect.isfunction(raises.fn)


@pipeline
def fanned(n: int = 4) -> None:
    one = source()
    gather([combine(one, 2) for _ in range(n)])


def test_calls_in_a_loop_share_their_inputs_and_stay_equal_to_validated_specs() -> None:
    spec, _ = fanned.compile(n=4)
    first, second = spec.steps[1], spec.steps[2]
    assert first.inputs is second.inputs  # one dict for the fan-out, not one per step
    assert first.parameters == {"b": 2} and first.parameters is not second.parameters
    assert PipelineSpec.model_validate_json(spec.model_dump_json()) == spec
