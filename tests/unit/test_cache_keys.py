"""The cache key and the code digest it starts from: what changes them and what does not."""

from __future__ import annotations

import textwrap
from itertools import count
from pathlib import Path

import pytest

from conveyor.contracts import ArtifactRef, OutputSelector, PipelineSpec, StepSpec
from conveyor.service.cache_keys import cache_key, without_cache
from conveyor.service.code_digest import code_digest, is_user_code
from conveyor.workers.steps import load_reference

BASE = """
from conveyor import step

LIMIT = 10

def unrelated(x):
    return x - 1

def helper(x):
    return min(x * 2, LIMIT)

class Scaler:
    def scale(self, x):
        return x * 3

@step(retries=1)
def work(x: int) -> int:
    return helper(x) + Scaler().scale(x)
"""

_files = count()


def digest_of(tmp_path: Path, source: str) -> str:
    """The code digest of ``work`` in a fresh module holding ``source``."""
    path = tmp_path / f"steps_{next(_files)}.py"
    path.write_text(textwrap.dedent(source))
    return code_digest(load_reference(f"{path}:work"))


def test_formatting_comments_options_and_unused_code_do_not_change_the_digest(
    tmp_path: Path,
) -> None:
    base = digest_of(tmp_path, BASE)
    assert base.startswith("sha256:") and len(base) == 71
    assert digest_of(tmp_path, BASE) == base
    reformatted = BASE.replace(
        "def unrelated(x):\n    return x - 1", "def unrelated(x) :\n\n    # why\n    return x-1"
    )
    assert reformatted != BASE
    assert digest_of(tmp_path, reformatted) == base
    assert digest_of(tmp_path, BASE.replace("return x - 1", "return x - 2")) == base
    spaced = BASE.replace("return min(x * 2, LIMIT)", "return min( x*2 ,LIMIT )  # clamp")
    assert digest_of(tmp_path, spaced) == base
    assert digest_of(tmp_path, BASE.replace("@step(retries=1)", "@step(retries=5)")) == base


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("return helper(x) + Scaler", "return helper(x) - Scaler"),  # the step's own body
        ("return min(x * 2, LIMIT)", "return min(x * 3, LIMIT)"),  # a helper it calls
        ("LIMIT = 10", "LIMIT = 11"),  # a constant a helper reads
        ("return x * 3", "return x * 4"),  # a method of a class it uses
    ],
)
def test_a_change_in_what_the_step_uses_changes_the_digest(
    tmp_path: Path, old: str, new: str
) -> None:
    assert old in BASE
    assert digest_of(tmp_path, BASE.replace(old, new)) != digest_of(tmp_path, BASE)


def test_library_and_conveyor_code_is_not_followed(tmp_path: Path) -> None:
    import json

    from conveyor import step

    assert not is_user_code(json.dumps) and not is_user_code(step) and not is_user_code(len)
    path = tmp_path / "user_steps.py"
    path.write_text("def helper():\n    return 1\n")
    assert is_user_code(load_reference(f"{path}:helper"))


def test_a_function_without_source_still_has_a_digest(tmp_path: Path) -> None:
    namespace: dict[str, object] = {}
    exec("def work(x):\n    return x + 1\n", namespace)  # no file: no source
    assert code_digest(namespace["work"]).startswith("sha256:")  # type: ignore[arg-type]


def ref(digest: str = "a", materializer: str = "json", version: str | None = "1") -> ArtifactRef:
    return ArtifactRef(
        uri=f"file:///store/{digest}",
        digest="blake3:" + digest * 64,
        size=3,
        materializer=materializer,
        materializer_version=version,
        data_type="builtins.int",
    )


def spec(**changes: object) -> StepSpec:
    fields: dict[str, object] = {
        "name": "work",
        "ref": "steps.py:work",
        "inputs": {"x": OutputSelector(step="load", output="output")},
        "parameters": {"n": 3, "label": "a"},
        "outputs": ["output"],
        "code_digest": "sha256:" + "0" * 64,
    }
    fields.update(changes)
    return StepSpec.model_validate(fields)


def test_the_key_covers_code_parameters_inputs_and_outputs() -> None:
    base = cache_key(spec(), {"x": ref()})
    assert base is not None and base == cache_key(spec(), {"x": ref()})
    different = [
        cache_key(spec(code_digest="sha256:" + "1" * 64), {"x": ref()}),
        cache_key(spec(parameters={"n": 4, "label": "a"}), {"x": ref()}),
        cache_key(spec(parameters={"n": 3, "label": "%_"}), {"x": ref()}),
        cache_key(spec(), {"x": ref("b")}),
        cache_key(spec(), {"x": ref(version="2")}),
        cache_key(spec(), {"x": ref(materializer="str")}),
        cache_key(spec(), {"x": [ref()]}),
        cache_key(spec(outputs=["output_0", "output_1"]), {"x": ref()}),
        cache_key(spec(allow_pickle=True), {"x": ref()}),
    ]
    assert base not in different and len(set(different)) == len(different)


def test_where_and_how_a_step_runs_is_not_in_the_key() -> None:
    base = cache_key(spec(), {"x": ref()})
    same = [
        cache_key(spec(name="work_2", ref="other/file.py:work"), {"x": ref()}),
        cache_key(spec(retries=3, timeout_s=5.0, pool="gpu"), {"x": ref()}),
        cache_key(spec(parameters={"label": "a", "n": 3}), {"x": ref()}),  # key order
        cache_key(spec(cache=False), {"x": ref()}),
        # The same bytes at another address (another store) are the same input.
        cache_key(spec(), {"x": ref().model_copy(update={"uri": "s3://b/x"})}),
    ]
    assert same == [base] * len(same)


def test_a_step_without_a_code_digest_has_no_key() -> None:
    assert cache_key(spec(code_digest=None), {"x": ref()}) is None


def test_without_cache_turns_it_off_for_every_step() -> None:
    pipeline = PipelineSpec(
        name="p", steps=[spec(name="load", inputs={}), spec(), spec(name="more", cache=False)]
    )
    off = without_cache(pipeline)
    assert [s.cache for s in off.steps] == [False, False, False]
    assert without_cache(off) is off
    # Left out of the JSON at its default: workers from before the field take the step.
    assert "cache" not in pipeline.steps[0].model_dump(mode="json")
    assert off.steps[0].model_dump(mode="json")["cache"] is False


def test_steps_typed_into_notebook_cells_have_a_digest_that_follows_their_helpers() -> None:
    from tests.unit.test_notebook_code import cells

    def digest(helper_body: str, comment: str = "") -> str:
        notebook = cells(
            "from conveyor import step\nLIMIT = 3\n",
            f"def helper(x):{comment}\n    return {helper_body}\n",
            "@step\ndef first(x: int) -> int:\n    return helper(x)\n",
        )
        return code_digest(notebook["first"])

    base = digest("x + LIMIT")
    assert digest("x + LIMIT", comment="  # a comment") == base
    assert digest("x - LIMIT") != base


def test_default_values_and_closed_over_values_count(tmp_path: Path) -> None:
    with_default = BASE.replace("def work(x: int)", "def work(x: int, k: int = LIMIT)")
    assert digest_of(tmp_path, with_default) != digest_of(
        tmp_path, with_default.replace("LIMIT = 10", "LIMIT = 12")
    )

    def made(k: object) -> str:
        def work(x: int) -> object:
            return (x, k)

        return code_digest(work)

    assert made(1) == made(1) and made(1) != made(2)
    assert made(object()) != made(object())  # no stable value: never the same key
