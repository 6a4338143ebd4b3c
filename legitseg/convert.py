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

from legitseg import __version__
from legitseg.errors import UsageError, WeightsError
from legitseg.weights import CONVERT_GLOBALS, extract_state_dict, sha256_file, unsafe_globals

log = logging.getLogger(__name__)


def _allowed_globals() -> list:
    out = []
    for dotted in CONVERT_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


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
        obj = obj[key]
        if not isinstance(obj, dict):
            raise WeightsError(f"{src}: entry {key!r} holds a {type(obj).__name__}, not a state_dict")
    state = extract_state_dict(obj, src, "convert")
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
