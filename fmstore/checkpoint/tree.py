"""Nested training state <-> named tensors plus a JSON tree (no pickle, ever).

``state`` is any nesting of dicts (str or int keys), lists and tuples whose leaves are
tensors, numpy arrays, or JSON values (None, bool, int, float, str).  Tensors get
'/'-joined path names (``model/layer0.weight``, ``optim/state/0/exp_avg``); the tree records
the structure with each leaf either a tensor name or an inline value, so it rebuilds exactly
(int keys stay ints, tuples stay tuples).  Anything else is refused with its path named.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import torch

from ..errors import FmstoreError


class UnsupportedValueError(FmstoreError, TypeError):
    """A state value that cannot be stored as a tensor or JSON; the message names its path."""


def _name_part(key: object) -> str:
    return str(key).replace("/", "%2F")


def flatten(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by name, JSON tree) for ``state``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: list[str]) -> dict[str, Any]:
        where = "/".join(path) or "<root>"
        if isinstance(node, torch.Tensor):
            name = _unique("/".join(path) or "tensor", tensors)
            tensors[name] = node
            return {"t": "tensor", "name": name}
        if type(node).__module__ == "numpy" and type(node).__name__ == "ndarray":
            name = _unique("/".join(path) or "array", tensors)
            tensors[name] = torch.from_numpy(node)
            return {"t": "ndarray", "name": name}
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise UnsupportedValueError(
                        f"state key {k!r} at {where!r}: dict keys must be str or int to be stored"
                    )
                items.append([k, walk(v, [*path, _name_part(k)])])
            out: dict[str, Any] = {"t": "odict" if isinstance(node, OrderedDict) else "dict", "items": items}
            # nn.Module.state_dict() carries per-module versions that load_state_dict reads.
            meta = getattr(node, "_metadata", None)
            if isinstance(meta, dict):
                out["metadata"] = [[k, v] for k, v in meta.items() if _is_json(v)]
            return out
        if isinstance(node, (list, tuple)):
            kind = "list" if isinstance(node, list) else "tuple"
            return {"t": kind, "items": [walk(v, [*path, str(i)]) for i, v in enumerate(node)]}
        if node is None or isinstance(node, (bool, str, int)):
            return {"t": "value", "v": node}
        if isinstance(node, float):
            if math.isfinite(node):
                return {"t": "value", "v": node}
            return {"t": "float", "v": repr(node)}  # inf/nan are not JSON
        raise UnsupportedValueError(
            f"cannot store the value at {where!r}: {type(node).__name__} is neither a tensor, "
            "a numpy array nor a JSON value (None, bool, int, float, str) in dicts/lists/tuples; "
            "convert it (e.g. to a tensor or a dict) or leave it out of the state"
        )

    tree = walk(state, [])
    return tensors, tree


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _unique(name: str, taken: dict[str, Any]) -> str:
    if name not in taken:
        return name
    i = 1
    while f"{name}~{i}" in taken:
        i += 1
    return f"{name}~{i}"


def unflatten(tree: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the state from its tree, taking tensors from ``tensors`` by name."""
    kind = tree["t"]
    if kind == "tensor":
        return tensors[tree["name"]]
    if kind == "ndarray":
        return tensors[tree["name"]].numpy()
    if kind in ("dict", "odict"):
        items = [(k, unflatten(v, tensors)) for k, v in tree["items"]]
        if kind == "dict":
            return dict(items)
        out = OrderedDict(items)
        if "metadata" in tree:
            out._metadata = OrderedDict((k, v) for k, v in tree["metadata"])  # type: ignore[attr-defined]
        return out
    if kind == "list":
        return [unflatten(v, tensors) for v in tree["items"]]
    if kind == "tuple":
        return tuple(unflatten(v, tensors) for v in tree["items"])
    if kind == "value":
        return tree["v"]
    if kind == "float":
        return float(tree["v"])
    raise FmstoreError(f"unknown node kind {kind!r} in a snapshot's state tree")


def tensor_names(tree: dict[str, Any]) -> list[str]:
    """Names of every tensor leaf in a tree, in order."""
    out: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node["t"] in ("tensor", "ndarray"):
            out.append(node["name"])
        elif node["t"] in ("dict", "odict"):
            for _, v in node["items"]:
                walk(v)
        elif node["t"] in ("list", "tuple"):
            for v in node["items"]:
                walk(v)

    walk(tree)
    return out
