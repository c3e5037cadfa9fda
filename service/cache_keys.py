"""Cache keys: which earlier step's outputs a step may reuse. Pure functions, no I/O.

A step is reused when its key is one an earlier step completed with: the key covers the
step's code digest (``service/code_digest.py``), its parameters, the digest of each input
and the materializer (and version) that wrote it, and its output names. Where the step is
in the pipeline, its name and the run do not count: the same work is the same work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from conveyor.contracts import ArtifactRef, PipelineSpec, StepSpec
from conveyor.contracts.models import prevalidated

KEY_VERSION = "conveyor-cache-1"
"""Part of every key: a change of what keys cover starts a new cache, never a wrong hit."""

Inputs = Mapping[str, ArtifactRef | list[ArtifactRef]]


def _input(ref: ArtifactRef) -> list[str | None]:
    return [ref.digest, ref.materializer, ref.materializer_version]


def cache_key(step: StepSpec, inputs: Inputs) -> str | None:
    """The cache key of ``step`` run on ``inputs``; None for a step without a code digest
    (compiled by a client from before caching), which is never reused."""
    if step.code_digest is None:
        return None
    described = {
        "version": KEY_VERSION,
        "code": step.code_digest,
        "parameters": step.parameters,
        "inputs": {
            name: [_input(r) for r in ref] if isinstance(ref, list) else _input(ref)
            for name, ref in inputs.items()
        },
        "outputs": step.outputs,
        "allow_pickle": step.allow_pickle,
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def without_cache(spec: PipelineSpec) -> PipelineSpec:
    """``spec`` with caching turned off for every step (``--no-cache``)."""
    if all(not s.cache for s in spec.steps):
        return spec
    # Copies of checked steps with one flag changed: nothing to validate again.
    steps = [
        prevalidated(StepSpec, {**s.__dict__, "cache": False}, s.model_fields_set | _CACHE)
        for s in spec.steps
    ]
    return spec.model_copy(update={"steps": steps})


_CACHE = frozenset({"cache"})
