"""The models ``fmstore serve`` builds from a snapshot, and the one place that reads their weights.

A *family* says how a snapshot becomes a model and how the model is run:

- :class:`GPTFamily`: train.py's byte-level GPT, built from the snapshot's tensor shapes
  (``model/tok.weight``, ``model/pos.weight``, ``model/blocks.N.*``; the number of heads, which
  no shape tells, from train.py's ``SIZES`` by ``d_model`` or from ``n_head=``); text is UTF-8
  bytes as tokens, the context is cropped to the model's ``seq_len``.
- :class:`CausalLM` (``--hf-config``): a transformers causal LM,
  ``AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(PATH))`` in the snapshot's dtypes,
  with the ``AutoTokenizer`` of the same directory (required: its ids are the model's).  The
  snapshot's ``model`` part is a module's state dict, as ``FmstoreCallback`` (hf.py) and a plain
  ``Checkpointer.save(step, {"model": hf_model})`` both save it; ``prefix=`` names another part.

:func:`load_weights` fills a built model in place through fmstore's streaming loader
(:func:`fmstore.serving.load_state_dict`): only the model's tensors are read (the optimizer's
are neither read nor allocated), the keys are checked before anything is read (never a
half-loaded model), every piece is verified before it is copied (a damaged one raises
CorruptBlobError), and host memory stays within the loader's ring.

:class:`Snapshots` lists a root's committed steps and loads one into :class:`Weights` (beside
the served ones), placed on the device or offloaded (:mod:`fmstore.integrations.serve_offload`).
"""

from __future__ import annotations

import collections
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from fmstore.integrations import require
from fmstore.integrations.serve_offload import place, release
from fmstore.integrations.serve_text import ByteText, Text, TokenizerText
from fmstore.integrations.train import GPT, SIZES, GPTConfig
from torch import nn

from fmstore import ConfigError
from fmstore.checkpoint import Root
from fmstore.offload import OffloadedParameters
from fmstore.serving import load_state_dict

__all__ = [
    "MODEL",
    "Weights",
    "GPTFamily",
    "CausalLM",
    "Snapshots",
    "model_config",
    "build_model",
    "load_weights",
]

#: The part of a snapshot's state that holds the model (train.py's ``LoopCheckpointer`` state,
#: hf.py's ``FmstoreCallback`` state).
MODEL = "model"
#: Files of a tokenizer saved by ``save_pretrained`` (any one will do for ``AutoTokenizer``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


# ----------------------------------------------------------------------------- train.py's GPT


def model_config(shapes: dict[str, list[int]], n_head: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of a snapshot's ``model/...`` tensor shapes (names as flattened by
    fmstore: ``model/tok.weight``).  ``n_head`` (no shape tells it): given, or train.py's ``SIZES``
    entry with this ``d_model``."""
    try:
        vocab, d_model = shapes[f"{MODEL}/tok.weight"]
        seq_len = shapes[f"{MODEL}/pos.weight"][0]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"the snapshot has no GPT model of fmstore.integrations.train (no {e})") from None
    layers = {int(m.group(1)) for k in shapes if (m := re.match(rf"{MODEL}/blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    if n_head is None:
        known = [h for d, _, h in SIZES.values() if d == d_model]
        if not known:
            raise ConfigError(f"no train.py size has d_model={d_model}: give the number of heads (--n-head)")
        n_head = known[0]
    if d_model % n_head:
        raise ConfigError(f"d_model={d_model} is not divisible by n_head={n_head}")
    return GPTConfig(d_model=d_model, n_layer=n_layer, n_head=n_head, seq_len=seq_len, vocab=vocab)


def build_model(
    shapes: dict[str, list[int]], n_head: int | None = None, device: str | torch.device = "cpu"
) -> GPT:
    """An uninitialised-to-be-overwritten GPT of the snapshot's shape on ``device``, in eval mode."""
    with torch.device("meta"):  # no random init: every tensor is overwritten by the load
        model = GPT(model_config(shapes, n_head))
    return model.to_empty(device=device).eval().requires_grad_(False)


def _under(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The manifest entries saved under ``prefix``, by their key below it."""
    head = prefix.strip("/") + "/"
    return {name[len(head) :]: e for name, e in tensors.items() if name.startswith(head)}


class GPTFamily:
    """train.py's byte-level GPT."""

    kind = "fmstore.integrations.train.GPT"

    def __init__(self, n_head: int | None = None, *, prefix: str = MODEL) -> None:
        self.n_head = n_head
        self.prefix = prefix
        self.text: Text = ByteText()

    def build(self, tensors: dict[str, Any], device: str | torch.device) -> nn.Module:
        shapes = {f"{MODEL}/{k}": list(e.shape) for k, e in _under(tensors, self.prefix).items()}
        return build_model(shapes, self.n_head, device)

    def context(self, model: nn.Module) -> int:
        return model.cfg.seq_len

    def logits(self, model: nn.Module, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(idx)  # causal attention: right padding never reaches a real position


# ----------------------------------------------------------------------------- transformers


class CausalLM:
    """A transformers causal LM of ``config`` (a ``config.json`` or the directory holding it) and
    the tokenizer saved in the same directory."""

    kind = "transformers"

    def __init__(self, config: str | os.PathLike[str], *, prefix: str = MODEL) -> None:
        transformers = require("transformers", "hf", by=__name__)
        path = os.fspath(config)
        if os.path.isdir(path):
            folder = path
        elif os.path.isfile(path):
            folder = os.path.dirname(path) or "."
        else:
            raise ConfigError(f"--hf-config {path!r}: no such file or directory")
        try:
            self.config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--hf-config {path!r} is not a transformers model config: {e}") from None
        if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            raise ConfigError(
                f"--hf-config {path!r}: no tokenizer in {folder!r} (none of {', '.join(TOKENIZER_FILES)}); "
                "a transformers model's token ids are its tokenizer's, so the byte-level text of "
                "train.py's GPT cannot stand in: save the tokenizer there (tokenizer.save_pretrained)"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"--hf-config {path!r}: the tokenizer in {folder!r} does not load: {e}"
            ) from None
        vocab = getattr(self.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ConfigError(
                f"--hf-config {path!r}: the tokenizer has {len(tokenizer)} ids, the model's vocab_size is {vocab}"
            )
        self.path = path
        self.prefix = prefix
        self.text: Text = TokenizerText(tokenizer, extra_eos=getattr(self.config, "eos_token_id", None))
        self._auto = transformers.AutoModelForCausalLM

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer  # type: ignore[attr-defined]

    def build(self, tensors: dict[str, Any], device: str | torch.device) -> nn.Module:
        """The model, in the dtypes of the snapshot's tensors (the most common floating one for
        all, then any tensor saved in another converted), on ``device``."""
        entries = _under(tensors, self.prefix)
        if not entries:
            raise ConfigError(f"the snapshot holds no tensors under {self.prefix!r} (--prefix)")
        floats = collections.Counter(
            e.torch_dtype for e in entries.values() if e.torch_dtype.is_floating_point
        )
        dtype = floats.most_common(1)[0][0] if floats else torch.float32
        with torch.device(device):
            try:
                model = self._auto.from_config(self.config, dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = self._auto.from_config(self.config, torch_dtype=dtype)
        for key, t in model.state_dict().items():
            entry = entries.get(key)
            if entry is None or t.dtype == entry.torch_dtype:
                continue  # a missing key is the loader's to report, with all the others
            owner, _, name = key.rpartition(".")
            module = model.get_submodule(owner)
            if name in module._parameters:
                module._parameters[name].data = t.to(entry.torch_dtype)
            else:
                module.register_buffer(name, t.to(entry.torch_dtype))
        return model.eval().requires_grad_(False)

    def context(self, model: nn.Module) -> int:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            n = getattr(self.config, name, None)
            if isinstance(n, int) and n > 0:
                return n
        return 2048

    def logits(self, model: nn.Module, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=idx, attention_mask=mask, use_cache=False).logits


# ----------------------------------------------------------------------------- loading


def load_weights(
    root: str,
    step: int,
    model: nn.Module,
    *,
    prefix: str = MODEL,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Fill ``model`` in place with the ``prefix`` part of committed snapshot ``step`` of
    ``root`` (see the module docstring)."""
    load_state_dict(root, step, into=model, prefix=prefix, storage_options=storage_options)


@dataclass(frozen=True)
class Weights:
    """One loaded step: the model (in eval mode, never trained) and the step it came from."""

    model: nn.Module
    step: int
    version: str  # what responses name: the step, or the weight_version an update gave
    family: Any = field(default_factory=GPTFamily)
    device: torch.device = torch.device("cpu")
    offload: OffloadedParameters | None = None  # None: all weights on the device

    def release(self) -> None:
        """Swapped out: remove the offload (its store's blobs) if any."""
        release(self.offload)


class Snapshots:
    """The committed steps of a root, and the model of one of them (read beside the served one),
    on ``device``; offloaded when its parameters exceed ``budget`` bytes."""

    def __init__(
        self,
        root: str,
        *,
        n_head: int | None = None,
        family: Any = None,
        device: str | torch.device = "cpu",
        budget: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        self.root = root
        self.family = family if family is not None else GPTFamily(n_head)
        self.device = torch.device(device)
        self.budget = budget
        self.storage_options = storage_options
        # Listing and manifests: a reader that never creates or writes anything under the root
        # (nor claims its writer lease: the training job keeps saving).
        self._root = Root(root, storage_options)
        self._lock = threading.Lock()  # the watcher and an update request list and load alike

    def steps(self) -> list[int]:
        with self._lock:
            return self._root.steps()

    def load(self, step: int, version: str | None = None) -> Weights:
        with self._lock:
            tensors = dict(self._root.snapshot(step).manifest.tensors)
            # With a budget the model is read on the host first: whether it fits is known then.
            model = self.family.build(tensors, "cpu" if self.budget is not None else self.device)
            load_weights(
                self.root, step, model, prefix=self.family.prefix, storage_options=self.storage_options
            )
        handle = place(model, self.device, self.budget) if self.budget is not None else None
        return Weights(model, step, version or str(step), self.family, self.device, handle)

    def close(self) -> None:
        self._root.close()
