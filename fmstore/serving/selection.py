"""Which tensors of a snapshot a serving load gives, under which keys, and the check of a target.

A load gives every tensor under its snapshot name, or the subtree saved under a ``prefix``
(``"model"`` of a state saved as ``{"model": model, "optim": ...}``) keyed by the paths below
it: a module's state-dict names.  A target (``into=``, a module or a dict of tensors) is
checked against those keys strictly, then tensor by tensor (shape, dtype), before a load
reads anything.
"""

from __future__ import annotations

from typing import Any

import torch

from ..blob import dtype_name
from ..checkpoint import Manifest
from ..errors import ConfigError, LoadMismatchError, SnapshotNotFoundError, StateKeysError

#: What ``into=`` takes.
Target = torch.nn.Module | dict[str, torch.Tensor]


class _Leaf:
    """A tensor leaf of :meth:`Manifest.state`, holding the tensor's name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def select(manifest: Manifest, prefix: str | None = None) -> dict[str, str]:
    """{key: snapshot tensor name} of the tensors a load gives: every tensor under its
    snapshot name, or those under ``prefix`` (a ``/``-separated path of the saved state,
    ``"model"``) keyed by their path below it (a module's state-dict names)."""
    if prefix is None:
        return {n: n for n in manifest.tensors}
    parts = [p for p in prefix.strip("/").split("/") if p]
    node = None
    # A saved int key (an optimizer's ``state/0``) is an int in the tree: try both readings.
    for path in (tuple(parts), tuple(int(p) if p.isdigit() else p for p in parts)):
        try:
            node = manifest.state(path, tensor=_Leaf, arrays_as_tensors=True)
            break
        except KeyError:
            continue
    if node is None:
        raise SnapshotNotFoundError(f"snapshot step {manifest.step} holds no state at {prefix!r}")
    out: dict[str, str] = {}

    def walk(value: Any, keys: list[str]) -> None:
        if isinstance(value, _Leaf):
            out["/".join(keys) or parts[-1]] = value.name
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, [*keys, str(k)])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, [*keys, str(i)])

    walk(node, [])
    return out


def check_targets(
    manifest: Manifest, into: Target | None, names: dict[str, str], prefix: str | None
) -> dict[str, torch.Tensor] | None:
    """``into``'s tensors by key, checked against the snapshot (keys, then each shape and
    dtype) before anything is read."""
    if into is None:
        return None
    if isinstance(into, torch.nn.Module):
        # state_dict() tensors share the parameters' and buffers' storage: copy_ into them
        # fills the module in place (and is not recorded by autograd).
        targets = {k: v for k, v in into.state_dict().items() if isinstance(v, torch.Tensor)}
    elif isinstance(into, dict):
        targets = dict(into)
    else:
        raise ConfigError(f"into= takes a torch.nn.Module or a dict of tensors, not {type(into).__name__}")
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(set(names) - set(targets))
    if missing or unexpected:
        hint = ""
        tops = {n.split("/", 1)[0] for n in names.values()}
        if prefix is None and any(f"{top}/{k}" in names for top in tops for k in targets):
            hint = f"; pass prefix= (one of {sorted(tops)}, e.g. prefix={sorted(tops)[0]!r})"
        raise StateKeysError.of(manifest.step, missing, unexpected, hint)
    for key, t in targets.items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"into[{key!r}] is a {type(t).__name__}, not a tensor")
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise ConfigError(f"into[{key!r}]: a {type(t).__name__} (a streaming load fills plain tensors)")
        entry = manifest.tensors[names[key]]
        if t.dtype != entry.torch_dtype or tuple(t.shape) != tuple(entry.shape):
            raise LoadMismatchError(
                f"tensor {key!r} ({names[key]!r}): snapshot step {manifest.step} has {entry.dtype} "
                f"{list(entry.shape)}, the target is {dtype_name(t.dtype)} {list(t.shape)}"
            )
    return targets
