"""Nested training state <-> named tensors plus a JSON tree (no pickle, ever).

``state`` is any nesting of dicts (str or int keys), lists and tuples whose leaves are
tensors, numpy arrays, or JSON values (None, bool, int, float, str).  Tensors get
'/'-joined path names (``model/layer0.weight``, ``optim/state/0/exp_avg``); the tree records
the structure with each leaf either a tensor name or an inline value, so it rebuilds exactly
(int keys stay ints, tuples stay tuples).  Anything else is refused with its path named.

A :class:`PerRank` node holds state that differs between ranks (random number generators):
each rank's subtree is stored under ``ranks`` (its tensors named ``<path>/rank-<r>/...``), and
a rank rebuilds its own.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Container, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import FmstoreError, UnsupportedValueError

if TYPE_CHECKING:  # flatten imports torch itself: reading a manifest's tree needs none
    import torch


def _name_part(key: object) -> str:
    return str(key).replace("/", "%2F")


class PerRank:
    """A subtree of the state that each rank saves and restores as its own (see the module doc)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def rank_part(rank: int) -> str:
    return f"rank-{rank}"


def flatten(state: Any, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any], set[str]]:
    """(tensors by name, JSON tree, names of the tensors only this rank holds) for ``state``."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    local: set[str] = set()

    def walk(node: Any, path: list[str]) -> dict[str, Any]:
        where = "/".join(path) or "<root>"
        if isinstance(node, PerRank):
            before = set(tensors)
            sub = walk(node.value, [*path, rank_part(rank)])
            local.update(set(tensors) - before)
            return {"t": "per_rank", "ranks": {str(rank): sub}}
        if isinstance(node, torch.Tensor):
            name = unique_name("/".join(path) or "tensor", tensors)
            tensors[name] = node
            return {"t": "tensor", "name": name}
        if type(node).__module__ == "numpy" and type(node).__name__ == "ndarray":
            name = unique_name("/".join(path) or "array", tensors)
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
    return tensors, tree, local


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def unique_name(name: str, taken: Container[str]) -> str:
    """``name``, or ``name~N`` with the first N that is not in ``taken``."""
    if name not in taken:
        return name
    i = 1
    while f"{name}~{i}" in taken:
        i += 1
    return f"{name}~{i}"


class _Missing:
    """A per-rank subtree the snapshot has no copy of for this rank (saved on fewer ranks)."""

    def __repr__(self) -> str:
        return "<not saved for this rank>"


MISSING = _Missing()


def unflatten(tree: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int = 0) -> Any:
    """Rebuild the state from its tree, taking tensors from ``tensors`` by name; a tensor not
    in ``tensors`` (not loaded: the target did not ask for it) is left out of its dict."""
    kind = tree["t"]
    if kind == "tensor":
        return tensors.get(tree["name"], MISSING)
    if kind == "ndarray":
        t = tensors.get(tree["name"])
        return MISSING if t is None else t.numpy()
    if kind == "per_rank":
        sub = tree["ranks"].get(str(rank))
        return MISSING if sub is None else unflatten(sub, tensors, rank)
    if kind in ("dict", "odict"):
        items = [(k, unflatten(v, tensors, rank)) for k, v in tree["items"]]
        items = [(k, v) for k, v in items if v is not MISSING]
        if kind == "dict":
            return dict(items)
        out = OrderedDict(items)
        if "metadata" in tree:
            out._metadata = OrderedDict((k, v) for k, v in tree["metadata"])  # type: ignore[attr-defined]
        return out
    if kind in ("list", "tuple"):
        seq = [unflatten(v, tensors, rank) for v in tree["items"]]
        seq = [None if v is MISSING else v for v in seq]  # positions matter: a gap, not a shift
        return seq if kind == "list" else tuple(seq)
    if kind == "value":
        return tree["v"]
    if kind == "float":
        return float(tree["v"])
    raise FmstoreError(f"unknown node kind {kind!r} in a snapshot's state tree")


def _children(node: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(key or index, child) of a dict or list/tuple node; none for any other node."""
    kind = node["t"]
    if kind in ("dict", "odict"):
        return [(k, v) for k, v in node["items"]]
    if kind in ("list", "tuple"):
        return list(enumerate(node["items"]))
    return []


def _walk(tree: dict[str, Any], rank: int) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """(path, node) of every leaf of a tree; of a per-rank subtree, this rank's (its path
    without the rank part)."""
    stack: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        kind = node["t"]
        if kind == "per_rank":
            sub = node["ranks"].get(str(rank))
            if sub is not None:
                stack.append((path, sub))
        elif kind in ("dict", "odict", "list", "tuple"):
            stack.extend(((*path, k), v) for k, v in reversed(_children(node)))
        else:
            yield path, node


def leaves(tree: dict[str, Any], rank: int = 0) -> dict[tuple[Any, ...], str]:
    """Every leaf of a tree as {path (tuple of keys): "tensor" | "value"}."""
    return {p: "tensor" if n["t"] in ("tensor", "ndarray") else "value" for p, n in _walk(tree, rank)}


def path_text(path: tuple[Any, ...]) -> str:
    return "/".join(_name_part(k) for k in path) or "<root>"


def per_rank_nodes(tree: dict[str, Any]) -> list[tuple[list[Any], dict[str, Any]]]:
    """(path, node) of every per-rank node of a tree, outermost first."""
    out: list[tuple[list[Any], dict[str, Any]]] = []

    def walk(node: dict[str, Any], path: list[Any]) -> None:
        if node["t"] == "per_rank":
            out.append((path, node))
            return
        for k, v in _children(node):
            walk(v, [*path, k])

    walk(tree, [])
    return out


def merge_per_rank(tree: dict[str, Any], rank: int, nodes: list[tuple[list[Any], dict[str, Any]]]) -> None:
    """Add another rank's per-rank subtrees (as :func:`per_rank_nodes` gave them) to ``tree``.

    Each is put into the per-rank node at its path, found by following the path down from the
    root (a coordinator merges every rank's nodes: walking its whole tree once per rank would
    cost ranks x tree)."""
    for path, node in nodes:
        target = _per_rank_at(tree, path)
        sub = node["ranks"].get(str(rank))
        if target is None or sub is None:
            raise FmstoreError(
                f"rank {rank} saved per-rank state at {path_text(tuple(path))!r} that rank 0 does not have; "
                "every rank must save the same structure"
            )
        target["ranks"][str(rank)] = sub


def _per_rank_at(tree: dict[str, Any], path: list[Any]) -> dict[str, Any] | None:
    """The per-rank node of ``tree`` at ``path`` that :func:`per_rank_nodes` lists (none inside
    another per-rank node), or None.  Keys match as their JSON does (``1`` is not ``"1"``)."""
    node = tree
    for k in path:
        kind = node["t"]
        if kind in ("dict", "odict"):
            node = next((v for key, v in node["items"] if type(key) is type(k) and key == k), None)
        elif kind in ("list", "tuple") and type(k) is int and 0 <= k < len(node["items"]):
            node = node["items"][k]
        else:  # a leaf, a per-rank node (not looked into), or a key that is not there
            return None
        if node is None:
            return None
    return node if node["t"] == "per_rank" else None


def tensor_leaves(tree: dict[str, Any], rank: int = 0) -> dict[tuple[Any, ...], str]:
    """{path: tensor name} of every tensor leaf (this rank's, under a per-rank node)."""
    return {p: n["name"] for p, n in _walk(tree, rank) if n["t"] in ("tensor", "ndarray")}


def compare(
    saved: dict[str, Any], target: dict[str, Any], rank: int, opaque: list[tuple[Any, ...]]
) -> tuple[list[str], list[str]]:
    """(paths the target has and the snapshot lacks, paths the snapshot has and the target
    lacks).  Tensors are compared everywhere; plain values only outside the ``opaque``
    subtrees (Stateful objects check their own, in ``load_state_dict``), whose roots must exist."""

    def inside(path: tuple[Any, ...]) -> bool:
        return any(path[: len(o)] == o for o in opaque)

    def keys(tree: dict[str, Any]) -> dict[tuple[Any, ...], str]:
        out = {p: kind for p, kind in leaves(tree, rank).items() if kind == "tensor" or not inside(p)}
        out.update({o: "stateful" for o in opaque if subtree(tree, o, rank) is not None})
        return out

    a, b = keys(saved), keys(target)
    missing = sorted(path_text(p) for p in b if a.get(p) != b[p])
    unexpected = sorted(path_text(p) for p in a if b.get(p) != a[p])
    return missing, unexpected


def arrays_as_tensors(node: dict[str, Any]) -> dict[str, Any]:
    """The tree with numpy-array leaves read as tensors (for a reader that knows no arrays, such
    as DCP's: :func:`unflatten` would call ``.numpy()`` on the tensors it is given for them)."""
    kind = node["t"]
    if kind == "ndarray":
        return {**node, "t": "tensor"}
    if kind in ("dict", "odict"):
        return {**node, "items": [[k, arrays_as_tensors(v)] for k, v in node["items"]]}
    if kind in ("list", "tuple"):
        return {**node, "items": [arrays_as_tensors(v) for v in node["items"]]}
    if kind == "per_rank":
        return {**node, "ranks": {r: arrays_as_tensors(v) for r, v in node["ranks"].items()}}
    return node


def per_rank_ranks(tree: dict[str, Any], path: tuple[Any, ...]) -> list[int] | None:
    """The ranks of the per-rank node at ``path`` (as :func:`per_rank_nodes` lists them), in
    order, or None where ``path`` is no per-rank node."""
    node = _per_rank_at(tree, list(path))
    return None if node is None else sorted(int(r) for r in node["ranks"])


def subtree(tree: dict[str, Any], path: tuple[Any, ...], rank: int = 0) -> dict[str, Any] | None:
    """The node at ``path`` (this rank's, through per-rank nodes), or None."""
    node: dict[str, Any] | None = tree
    for k in (*path, None):
        if node is not None and node["t"] == "per_rank":
            node = node["ranks"].get(str(rank))
        if node is None or k is None:
            break
        node = next((v for key, v in _children(node) if key == k), None)
    return node
