"""``fmstore diff ROOT A B`` (two steps of one root) or ``fmstore diff ROOT_A ROOT_B`` (the
newest step of each, or ``--steps A B``; each may be a snapshot's own directory,
``ckpt/step-0000000100 ckpt/step-0000000200``): which tensors changed, by how much, and their
bytes.

A tensor whose shards are the same stored bytes in both (an incremental reference, or equal
checksums) is unchanged without being read; others are read one at a time and compared:
``max_abs`` = max |a - b|, ``max_rel`` = max |a - b| / max |a| (0 where a is all zeros and b
equals it)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from ..units import format_size
from ._common import add_storage_options, open_root, print_json, resolve_root, snapshot_dir, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare two snapshots tensor by tensor")
    p.add_argument(
        "args",
        nargs="+",
        metavar="ROOT A B | ROOT_A ROOT_B",
        help="two steps of one root, or two roots (or snapshots' own directories: ROOT/step-0000000200)",
    )
    p.add_argument(
        "--steps", type=int, nargs=2, metavar=("A", "B"), help="with two roots: the steps to compare"
    )
    p.add_argument("--tensor", default=None, metavar="PATTERN", help="only tensors matching this glob")
    p.add_argument("--all", action="store_true", help="list unchanged tensors too")
    p.add_argument("--json", action="store_true", help="print JSON: one entry per tensor")
    add_storage_options(p)
    p.set_defaults(run=run)


def _targets(args: argparse.Namespace) -> tuple[str, int | None, str, int | None]:
    a = args.args
    if len(a) == 3:
        try:
            steps = int(a[1]), int(a[2])
        except ValueError:
            raise ConfigError(f"diff ROOT A B takes two step numbers, got {a[1]!r} and {a[2]!r}") from None
        root, own = snapshot_dir(a[0], args)
        if own is not None:
            raise ConfigError(
                f"{a[0]!r} is the directory of step {own}; diff ROOT A B takes the root: "
                f"fmstore diff {root} {steps[0]} {steps[1]}"
            )
        return root, steps[0], root, steps[1]
    if len(a) == 2:
        sa, sb = args.steps if args.steps else (None, None)
        ra, sa = resolve_root(a[0], sa, args, option="--steps A")
        rb, sb = resolve_root(a[1], sb, args, option="--steps B")
        return ra, sa, rb, sb
    raise ConfigError("diff takes ROOT A B (two steps of one root) or ROOT_A ROOT_B")


def compare(sa: Any, sb: Any, pattern: str | None = None) -> list[dict[str, Any]]:
    """One entry per tensor name of either snapshot: status and, where both have it, the
    differences."""
    import torch

    ta = {t.name: t for t in sa.tensors(pattern)}
    tb = {t.name: t for t in sb.tensors(pattern)}
    out = []
    for name in sorted(ta.keys() | tb.keys()):
        a, b = ta.get(name), tb.get(name)
        row: dict[str, Any] = {"tensor": name, "max_abs": None, "max_rel": None}
        if a is None or b is None:
            t = a or b
            row.update(status="only in A" if b is None else "only in B", bytes=t.raw_bytes)
            out.append(row)
            continue
        row["bytes"] = b.raw_bytes
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            row["status"] = f"{a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}"
            out.append(row)
            continue
        if _same_bytes(sa.manifest.tensors[name], sb.manifest.tensors[name]):
            row.update(status="same", max_abs=0.0, max_rel=0.0)
            out.append(row)
            continue
        x, y = sa.read(name), sb.read(name)
        if x.dtype.is_floating_point or x.dtype.is_complex:
            d = (x.double() - y.double()).abs()
            max_abs = float(d.max()) if d.numel() else 0.0
            scale = float(x.double().abs().max()) if x.numel() else 0.0
        else:
            d = (x.long() - y.long()).abs() if x.dtype != torch.bool else (x != y).long()
            max_abs = float(d.max()) if d.numel() else 0.0
            scale = float(x.long().abs().max()) if x.numel() and x.dtype != torch.bool else 1.0
        max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
        row.update(
            status="changed" if max_abs or not torch.equal(x, y) else "same", max_abs=max_abs, max_rel=max_rel
        )
        out.append(row)
    return out


def _same_bytes(ea: Any, eb: Any) -> bool:
    """The same shards with the same checksums: equal without reading."""
    if len(ea.shards) != len(eb.shards):
        return False
    return all(
        (x.offsets, x.lengths, x.checksum, x.codec) == (y.offsets, y.lengths, y.checksum, y.codec)
        for x, y in zip(ea.shards, eb.shards)
    )


def run(args: argparse.Namespace) -> int:
    ra, sa_step, rb, sb_step = _targets(args)
    with open_root(ra, args) as root_a:
        root_b = root_a if rb == ra else open_root(rb, args)
        try:
            sa, sb = root_a.snapshot(sa_step), root_b.snapshot(sb_step)
            rows = compare(sa, sb, args.tensor)
        finally:
            if root_b is not root_a:
                root_b.close()
    changed = [r for r in rows if r["status"] != "same"]
    if args.json:
        print_json({"a": {"root": ra, "step": sa.step}, "b": {"root": rb, "step": sb.step}, "tensors": rows})
        return 0
    shown = rows if args.all else changed
    print(f"A: step {sa.step} of {ra}\nB: step {sb.step} of {rb}")
    if shown:
        cells = [
            [
                r["tensor"],
                r["status"],
                "-" if r["max_abs"] is None else f"{r['max_abs']:.3g}",
                "-" if r["max_rel"] is None else f"{r['max_rel']:.3g}",
                format_size(r["bytes"]),
            ]
            for r in shown
        ]
        print(table(cells, ["tensor", "status", "max_abs", "max_rel", "bytes"]))
    nbytes = sum(r["bytes"] for r in changed)
    print(
        f"{len(changed)} of {len(rows)} tensor(s) differ ({format_size(nbytes)}); {len(rows) - len(changed)} same"
    )
    return 0
