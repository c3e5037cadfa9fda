"""PyTorch tensors and state dicts through safetensors (``conveyor[torch]``; torch itself is
yours to install, CPU or CUDA). A safetensors file is a JSON header and raw tensor bytes:
reading one builds no object but tensors.

Tensors are stored detached and contiguous, and come back on the CPU: ``.to(device)`` them.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.contracts import ArtifactRef

TENSOR_KEY = "tensor"
ORDER_KEY = "conveyor.keys"


def _is_tensor(value: object) -> bool:
    # By name along the MRO, so that a plain dict does not import torch.
    return any(f"{c.__module__}.{c.__qualname__}" == "torch.Tensor" for c in type(value).__mro__)


def _writable(tensors: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous tensors; a tensor that shares storage with an earlier one (tied
    weights) is copied, since safetensors refuses shared storage."""
    seen: set[tuple[int, str]] = set()
    out: dict[str, Any] = {}
    for key, tensor in tensors.items():
        plain = tensor.detach().contiguous()
        storage = (plain.untyped_storage().data_ptr(), str(plain.device))
        if storage in seen and plain.numel():
            plain = plain.clone()
        seen.add(storage)
        out[key] = plain
    return out


class Tensor:
    """One tensor."""

    name = "torch.tensor"
    version = "1"
    types = ("torch.Tensor",)

    def handles(self, value: object) -> bool:
        return _is_tensor(value)

    def save(self, value: object, path: str) -> str | None:
        from safetensors.torch import save_file

        save_file(_writable({TENSOR_KEY: value}), path)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        from safetensors.torch import load_file

        return load_file(path)[TENSOR_KEY]


class StateDict:
    """A dict of str to tensors, as ``module.state_dict()`` returns; key order is kept."""

    name = "torch.state_dict"
    version = "1"
    types = ("builtins.dict",)

    def handles(self, value: object) -> bool:
        if not isinstance(value, dict) or not value:
            return False
        return all(isinstance(k, str) and _is_tensor(v) for k, v in value.items())

    def save(self, value: object, path: str) -> str | None:
        from safetensors.torch import save_file

        assert isinstance(value, dict)
        save_file(_writable(value), path, metadata={ORDER_KEY: json.dumps(list(value))})
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            order = json.loads((handle.metadata() or {}).get(ORDER_KEY, "[]"))
            keys = order if sorted(order) == sorted(handle.keys()) else list(handle.keys())
            return {key: handle.get_tensor(key) for key in keys}
