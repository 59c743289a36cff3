"""``fmstore export``: write a snapshot's tensors as a safetensors file, a Hugging Face folder
or a zarr v3 store, for tools that do not read fmstore roots."""

from __future__ import annotations

import argparse
import os
import time

from ._common import ROOT_HELP, add_storage_options, open_root, print_json, progress, resolve_root

FORMATS = ("hf", "safetensors", "zarr")

DESCRIPTION = """\
Write the tensors of one committed snapshot (default: the newest) to OUT, a local path:

  safetensors  one .safetensors file (metadata: fmstore_step, fmstore_root, format=pt)
  hf           a Hugging Face folder: model.safetensors, or model-0000i-of-0000N.safetensors
               shards plus model.safetensors.index.json above --max-shard-size, and
               config.json (from --config, else the snapshot's meta["hf_config"] if it has one)
  zarr         a zarr v3 store: one array per tensor at path = its name, chunked along dim 0
               (about 4 MiB a chunk).  zarr v3 has no bfloat16 (nor float8): such a tensor is
               stored as the unsigned integers of its bit patterns (bfloat16 -> uint16) and
               the array's attribute "fmstore_dtype" names the torch dtype; every array has
               it, so torch.from_numpy(numpy.asarray(a[...])).view(getattr(torch,
               a.attrs["fmstore_dtype"])) gives the tensor back exactly.
"""

EPILOG = """\
Names: --prefix P strips P from every selected tensor's name (each must start with it).
Default (auto): when every selected name has a '/' and all share the first component, that
component and its '/' are stripped, so a state saved as {"model": hf_model} exports with the
HF parameter names (model/lm_head.weight -> lm_head.weight); --prefix '' keeps the names.
Select the weights without optimizer state with --select 'model/*'.

Tied weights (GPT-2's lm_head.weight and transformer.wte.weight) are saved by fmstore as two
tensors; both are exported, each as its own tensor (safetensors refuses shared storage), and
transformers ties them again on load.

Every tensor is verified against the snapshot's checksums as it is read; the output is
written under a hidden temporary name next to OUT and renamed into place at the end, so an
interrupted export leaves nothing under OUT.  An existing OUT is refused without --force.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a snapshot's tensors as safetensors, a Hugging Face folder or zarr",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("out", metavar="OUT", help="where to write (a local path)")
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--step", type=int, default=None, help="the snapshot's step (default: the newest)")
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="PATTERN",
        help="export only tensors whose snapshot name matches this glob (repeatable), e.g. 'model/*'",
    )
    p.add_argument(
        "--prefix",
        default=None,
        metavar="P",
        help="strip P from every tensor name (default: auto, see below; '' keeps the names)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="hf: the largest weights file before the folder is sharded (default 5GB, as transformers)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="hf: a config.json (or a folder holding one) to copy into the output",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT (of the same format)")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, FmstoreError
    from ..storage import AtomicOutput
    from ..units import format_size, parse_size
    from . import _export_formats as fmt
    from ._export_io import name_items, select

    if args.config is not None and args.format != "hf":
        raise ConfigError("--config goes with --format hf")
    max_size = parse_size(args.max_shard_size, what="--max-shard-size")
    url, step = resolve_root(args.root, args.step, args)
    t0 = time.perf_counter()
    is_dir = args.format != "safetensors"
    looks_like = {
        "hf": fmt.looks_like_hf,
        "zarr": fmt.looks_like_zarr,
        "safetensors": fmt.looks_like_safetensors,
    }[args.format]
    # Refuse an existing OUT before anything is read.
    AtomicOutput.check(args.out, is_dir=is_dir, force=args.force, looks_like=looks_like)
    with open_root(url, args) as root:
        snap = root.snapshot(step)
        items, prefix = name_items(select(snap, args.select), args.prefix)
        total = sum(it.nbytes for it in items)
        source = root.url if "://" in root.url else os.path.abspath(root.url)
        metadata = {"fmstore_step": str(snap.step), "fmstore_root": source}
        config = fmt.hf_config(args.config, snap.meta) if args.format == "hf" else (None, None)
        if args.format != "zarr":
            for it in items:
                fmt.safetensors_code(it)  # an unsupported dtype fails before anything is written
        try:
            with AtomicOutput(args.out, is_dir=is_dir, force=args.force, looks_like=looks_like) as out:
                with progress(total, f"export {args.format}") as bar:
                    if args.format == "safetensors":
                        order = fmt.layout(items)
                        w = fmt.Writer(snap, order, bar)
                        try:
                            size = fmt.write_safetensors(out.tmp, order, w, {**fmt.HF_FORMAT, **metadata})
                        finally:
                            w.close()
                        files = [(os.path.basename(out.final), size)]
                    elif args.format == "hf":
                        files = fmt.write_hf(
                            out.tmp, items, snap, bar, max_size=max_size, metadata=metadata, config=config
                        )
                    else:
                        attrs = {"step": snap.step, "root": source, "tensors": len(items), "prefix": prefix}
                        files = fmt.write_zarr(out.tmp, items, snap, bar, attrs)
                out.commit()
        except OSError as e:
            raise FmstoreError(f"export to {args.out!r} failed: {e}") from None
    seconds = time.perf_counter() - t0
    summary = {
        "format": args.format,
        "root": root.url,
        "step": snap.step,
        "out": out.final,
        "prefix": prefix,
        "tensors": len(items),
        "bytes": total,
        "files": [{"name": n, "bytes": b} for n, b in files],
        "seconds": round(seconds, 3),
    }
    if args.json:
        print_json(summary)
        return 0
    stripped = f", prefix {prefix!r} stripped" if prefix else ""
    print(
        f"exported {len(items)} tensor(s) ({format_size(total)}) of step {snap.step} from {root.url} "
        f"to {out.final} ({args.format}{stripped}) in {seconds:.2f} s"
    )
    if args.format == "hf":
        for n, b in files:
            print(f"  {n}  {format_size(b)}")
        if not any(n == "config.json" for n, _ in files):
            print("  (no config.json: pass --config to add one)")
    elif args.format == "zarr":
        print(f"  {len(items)} array(s), {format_size(files[0][1])} on disk")
    return 0
