"""`legitseg models convert`: a training checkpoint -> a plain safetensors weights file.

Training checkpoints (Lightning's `.ckpt`, say) keep objects beside the weights,
such as `pathlib.PosixPath` values in `hyper_parameters`, that the weights_only
guard refuses at run time. Conversion reads the file with that same guard, widened
only by the short, fixed list `weights.CONVERT_GLOBALS`, never with
weights_only=False, and writes the state_dict alone.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import pickle
from pathlib import Path

from legitseg._version import __version__
from legitseg.errors import UsageError, WeightsError
from legitseg.models.weights import CONVERT_GLOBALS, NESTED_KEYS, sha256_file, unsafe_globals

log = logging.getLogger(__name__)


def _allowed_globals() -> list:
    out = []
    for dotted in CONVERT_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


def _state_dict(obj: object, src: Path, key: str | None) -> dict:
    """The state_dict in a loaded checkpoint: entry `key`, else the file itself, else the first of
    NESTED_KEYS that holds only tensors. Raises WeightsError naming the file and, when a dict of
    tensors holds something else, that entry and its type (safetensors stores tensors only)."""
    import torch

    if not isinstance(obj, dict):
        raise WeightsError(f"{src} holds a {type(obj).__name__}, not a state_dict")
    if key is not None:
        places = [(f"entry {key!r}", obj[key])]
    else:
        places = [("the top level", obj)] + [(f"entry {k!r}", obj[k]) for k in NESTED_KEYS
                                             if isinstance(obj.get(k), dict)]
    tensors = {where: sum(isinstance(v, torch.Tensor) for v in d.values()) for where, d in places}
    for where, d in places:
        if d and tensors[where] == len(d) and all(isinstance(k, str) for k in d):
            return d
    where, d = max(places, key=lambda p: tensors[p[0]])  # the first of the most tensor-filled
    if not tensors[where]:
        if key is not None:
            raise WeightsError(f"{src}: entry {key!r} is a dict without tensors at the top level "
                               f"(its keys: {', '.join(map(str, list(d)[:8]))})")
        raise WeightsError(f"{src} is a dict without tensors at the top level or under "
                           f"{', '.join(NESTED_KEYS)} (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    bad = [k for k, v in d.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    first = bad[0]
    if isinstance(first, str):
        what = f"entry {first!r} is {_a(type(d[first]).__name__)}, not a tensor"
    else:
        what = f"key {first!r} is {_a(type(first).__name__)}, not a string"
    more = f" (and {len(bad) - 1} more such entr{'y' if len(bad) == 2 else 'ies'})" if len(bad) > 1 else ""
    raise WeightsError(f"{src}: in the state_dict at {where}, {what}{more}; a weights file holds "
                       "tensors under string names only: remove it from the state_dict before saving")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def convert_checkpoint(src: Path, dst: Path, key: str | None = None) -> str:
    """Write the state_dict of torch checkpoint `src` to safetensors file `dst`; return dst's sha256.

    `key` names the entry holding the state_dict (default: the file itself, or the
    first of state_dict, model_state_dict, model that holds one). Raises UsageError
    for unusable paths and WeightsError for files that are refused or hold no weights.
    """
    import torch
    from safetensors.torch import save_file

    if dst.suffix.lower() != ".safetensors":
        raise UsageError(f"{dst}: the output must be a .safetensors file")
    if dst.exists():
        raise UsageError(f"{dst} exists; legitseg never overwrites a weights file (remove it first)")
    try:
        data = src.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {src}: {err.strerror or err}") from err
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [g for g in unsafe_globals(data) if g not in CONVERT_GLOBALS]
        raise WeightsError(
            f"{src} holds objects that convert does not rebuild ({', '.join(refused) or type(err).__name__}); "
            f"it reads only tensors, plain containers and {', '.join(CONVERT_GLOBALS)}, and never runs code "
            "from a file: save model.state_dict() with safetensors from the training code instead"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {src} as a torch checkpoint: {err}") from err
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{src} has no entry {key!r} (top-level keys: {have})")
        if not isinstance(obj[key], dict):
            raise WeightsError(f"{src}: entry {key!r} holds a {type(obj[key]).__name__}, not a state_dict")
    state = _state_dict(obj, src, key)
    # clone() gives each tensor its own storage: safetensors refuses shared (tied) ones.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "converted_by": f"legitseg {__version__}", "source": src.name,
                "source_sha256": hashlib.sha256(data).hexdigest(), "source_key": key or "auto"}
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, dst)
    except OSError as err:
        raise UsageError(f"cannot write {dst}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %d tensors of %s to %s", len(tensors), src, dst)
    return sha256_file(dst)
