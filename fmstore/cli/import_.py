"""``fmstore import``: a safetensors file or a Hugging Face folder as a committed snapshot."""

from __future__ import annotations

import argparse
import json
import os

from ._common import add_storage_options, print_json

DESCRIPTION = """\
Read the tensors of SRC (a .safetensors file, a model.safetensors.index.json, or a folder
holding either: a Hugging Face model folder, single-file or sharded) and save them as
snapshot --step N under ROOT through fmstore's Checkpointer, committed like any other.

Each tensor is saved as P + its name ('/'-separated parts become nested keys, so the
names come out exactly so): with the default --prefix model/, lm_head.weight is saved as
model/lm_head.weight, as a state {"model": hf_model} would have it, and
Checkpointer(ROOT).load({"model": model}) restores the model.  A config.json next to the
weights is kept in the snapshot's meta["hf_config"] (fmstore export --format hf writes it
back).  An existing step is refused; all tensors are read into memory before the save.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="save a safetensors file or a Hugging Face folder as a snapshot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="a .safetensors file, an index .json, or a folder")
    p.add_argument("root", metavar="ROOT", help="the checkpoint root to write to (a directory or URL)")
    p.add_argument("--step", type=int, required=True, help="the step to save it as (must not exist)")
    p.add_argument("--prefix", default="model/", metavar="P", help="put before every name (default model/)")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from ..checkpoint import Checkpointer, RootNotFoundError
    from ..errors import ConfigError, FmstoreError
    from ..units import format_size
    from ._common import storage_options

    t0 = time.perf_counter()
    files, config = source_files(args.src, RootNotFoundError)
    ck = Checkpointer(args.root, storage_options=storage_options(args), no_dist=True)
    try:
        if args.step in ck.steps():  # before anything is read
            raise FmstoreError(
                f"step {args.step} is already committed under {ck.storage.url!r}; it is never overwritten"
            )
        tensors, file_meta = read_tensors(files)
        state = nest(tensors, args.prefix, ConfigError)
        meta: dict[str, object] = {"imported_from": os.path.abspath(args.src)}
        if config is not None:
            meta["hf_config"] = config
        if file_meta:
            meta["source_metadata"] = file_meta
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())  # type: ignore[attr-defined]
        info = ck.save(args.step, state, meta=meta).wait()
    finally:
        ck.close()
    seconds = time.perf_counter() - t0
    summary = {
        "src": os.path.abspath(args.src),
        "root": ck.storage.url,
        "step": args.step,
        "prefix": args.prefix,
        "files": [os.path.basename(f) for f in files],
        "tensors": len(tensors),
        "bytes": nbytes,
        "bytes_written": info.bytes_written,
        "hf_config": config is not None,
        "seconds": round(seconds, 3),
    }
    if args.json:
        print_json(summary)
        return 0
    cfg = ", config.json in meta['hf_config']" if config is not None else ""
    print(
        f"imported {len(tensors)} tensor(s) ({format_size(nbytes)}) from {len(files)} file(s) of {args.src} "
        f"as step {args.step} under {ck.storage.url} in {seconds:.2f} s{cfg}"
    )
    first = next(iter(tensors))
    print(f"  names: {args.prefix}<name>, e.g. {args.prefix}{first}")
    return 0


def read_tensors(files: list[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Every tensor of the files by name (a name in two files is an error), and the first
    file's ``__metadata__``."""
    from safetensors import safe_open

    from ..errors import FmstoreError

    tensors: dict[str, object] = {}
    where: dict[str, str] = {}
    file_meta: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                file_meta = file_meta or dict(f.metadata() or {})
                for name in f.keys():
                    if name in tensors:
                        raise FmstoreError(
                            f"tensor {name!r} is in both {where[name]!r} and {os.path.basename(path)!r}"
                        )
                    tensors[name] = f.get_tensor(name)
                    where[name] = os.path.basename(path)
        except FmstoreError:
            raise
        except Exception as e:  # safetensors' own errors: a truncated or malformed file
            raise FmstoreError(f"cannot read {path!r} as safetensors: {e}") from None
    if not tensors:
        raise FmstoreError(f"{', '.join(files)} hold(s) no tensors")
    return tensors, file_meta


def source_files(src: str, not_found: type[Exception]) -> tuple[list[str], dict | None]:
    """The safetensors files of ``src`` and the config.json beside them (parsed), if any."""
    if os.path.isdir(src):
        folder = src
        index = os.path.join(src, "model.safetensors.index.json")
        indexes = sorted(n for n in os.listdir(src) if n.endswith(".safetensors.index.json"))
        if not os.path.isfile(index) and len(indexes) == 1:
            index = os.path.join(src, indexes[0])
        if os.path.isfile(index):
            files = _from_index(index)
        elif os.path.isfile(os.path.join(src, "model.safetensors")):
            files = [os.path.join(src, "model.safetensors")]
        else:
            files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))
        if not files:
            raise not_found(f"no .safetensors file in {src!r}")
    elif os.path.isfile(src):
        folder = os.path.dirname(os.path.abspath(src))
        files = _from_index(src) if src.endswith(".json") else [src]
    else:
        raise not_found(f"no such file or folder {src!r}")
    for f in files:
        if not os.path.isfile(f):
            raise not_found(f"{f!r} (named by the index) is missing")
    config = None
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as fh:
            config = json.load(fh)
    return files, config


def _from_index(path: str) -> list[str]:
    from ..errors import FmstoreError

    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise FmstoreError(f"{path!r} is not a safetensors index (no weight_map): {e}") from None
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]


def nest(tensors: dict[str, object], prefix: str, error: type[Exception]) -> dict[str, object]:
    """A nested dict whose '/'-joined paths are prefix + name, for the Checkpointer to save."""
    root: dict[str, object] = {}
    for name, t in tensors.items():
        parts = (prefix + name).split("/")
        if any(not p for p in parts):
            raise error(f"tensor name {prefix + name!r} has an empty part; pass another --prefix")
        node = root
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise error(f"{prefix + name!r}: {p!r} is both a tensor and a folder of names")
            node = child
        if parts[-1] in node:
            raise error(f"{prefix + name!r}: the name is both a tensor and a folder of names")
        node[parts[-1]] = t
    return root
