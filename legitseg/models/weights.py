"""sha256 pinning and safe loading of weights files (SPEC section 3).

The hash is checked on the bytes that a loader will read, before any loader sees
them; pickles are only ever opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legitseg.errors import ManifestError, WeightsError

if TYPE_CHECKING:  # torch is imported where tensors are read, so `models hash` stays light
    import torch

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "model.", "_orig_mod.")
PRETRAINED_FILE = "model.safetensors"
# What `legitseg models convert` lets torch.load rebuild besides tensors and plain
# containers: values training frameworks keep in checkpoints (Lightning's
# hyper_parameters, argparse options). Rebuilding them runs no code of the file's
# choosing: each is called with strings or keyword values only.
CONVERT_GLOBALS = ("pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "argparse.Namespace")

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hashed_file(weights: Path) -> Path:
    """The file whose sha256 the manifest pins: the file itself, or a save_pretrained dir's model.safetensors."""
    return weights / PRETRAINED_FILE if weights.is_dir() else weights


def read_verified(weights: Path, expected: str, model: str) -> bytes:
    """The pinned file's bytes, after checking that their sha256 equals `expected`.

    Loaders parse these very bytes, so nothing can change the file between the
    check and the load. Raises WeightsError.
    """
    target = hashed_file(weights)
    try:
        data = target.read_bytes()
    except OSError as err:
        raise WeightsError(f"model {model!r}: cannot read weights {target}: {err.strerror or err}") from err
    _compare(target, hashlib.sha256(data).hexdigest(), expected, model)
    return data


def verify_sha256(weights: Path, expected: str, model: str) -> None:
    """Raise WeightsError unless the pinned file exists and its sha256 equals `expected` (streams the file)."""
    target = hashed_file(weights)
    try:
        actual = sha256_file(target)
    except OSError as err:
        raise WeightsError(f"model {model!r}: cannot read weights {target}: {err.strerror or err}") from err
    _compare(target, actual, expected, model)


def _compare(target: Path, actual: str, expected: str, model: str) -> None:
    if actual != expected:
        raise WeightsError(
            f"model {model!r}: sha256 mismatch for {target}: manifest pins {expected}, "
            f"file has {actual}. Refusing to load it."
        )


def parse_state_dict(data: bytes, weights: Path, model: str) -> dict[str, torch.Tensor]:
    """Tensors from verified bytes of a weights file or a save_pretrained folder's model.safetensors.

    Raises WeightsError for unknown formats, refused pickles or content that is not a state_dict.
    """
    if weights.is_dir():
        return _parse_safetensors(data, weights / PRETRAINED_FILE, model)
    suffix = weights.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _parse_safetensors(data, weights, model)
    if suffix in PICKLE_SUFFIXES:
        return _parse_pickle(data, weights, model)
    raise WeightsError(
        f"model {model!r}: unsupported weights format {weights.name!r}; accepted: "
        ".safetensors, .pt/.pth/.ckpt/.bin (torch.save state_dict), or an smp save_pretrained folder"
    )


def _parse_safetensors(data: bytes, path: Path, model: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"model {model!r}: {path} is not a valid safetensors file: {err}") from err


def _parse_pickle(data: bytes, path: Path, model: str) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(refusal_message(data, err, path, model)) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"model {model!r}: cannot read {path} as a torch checkpoint: {err}") from err
    return extract_state_dict(obj, path, model)


def refusal_message(data: bytes, err: pickle.UnpicklingError, path: Path, model: str | None) -> str:
    """One line: what torch's weights_only guard refused, and how to re-save the weights safely."""
    who = f"model {model!r}: " if model else ""
    found = unsafe_globals(data)
    advice = "legitseg never unpickles code or objects from a weights file; "
    if found and all(g in CONVERT_GLOBALS for g in found):
        advice += (f"this looks like a training checkpoint (Lightning keeps hyper_parameters in it): "
                   f"extract the weights with `legitseg models convert {path} "
                   f"{path.with_suffix('.safetensors')}` and pin the new file's sha256.")
    else:
        advice += "save a plain state_dict (torch.save(model.state_dict(), ...)) or use safetensors."
    return (f"{who}{path} holds objects other than tensors and plain containers "
            f"(torch.load with weights_only=True refused it: {_refusal_reason(err)}). {advice}")


def unsafe_globals(data: bytes) -> list[str]:
    """Names of the Python globals a torch checkpoint would need, read without unpickling it."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except (RuntimeError, ValueError, pickle.UnpicklingError, OSError, EOFError):
        return []  # not torch.save's zip format: torch's own reason has to do


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The sentence of torch's weights_only error that says what was refused.

    torch's message opens with advice to retry with weights_only=False, which is
    exactly what legitseg must never do, and ends with how to allow-list the global
    in code; only the reason is kept.
    """
    reasons = []
    for line in str(err).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        line = line.split(" Please use `torch.serialization", 1)[0]
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)")):
            reasons.append(line)
    return " ".join(reasons) or type(err).__name__


def extract_state_dict(obj: Any, path: Path, model: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict) and _is_state_dict(obj[key]):
                return obj[key]
        raise WeightsError(
            f"model {model!r}: {path} is a dict without tensors at the top level or under "
            f"{', '.join(NESTED_KEYS)} (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
        )
    if not isinstance(obj, dict):
        raise WeightsError(f"model {model!r}: {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _is_state_dict(d: dict) -> bool:
    import torch

    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` from DataParallel, `model.` from Lightning, `_orig_mod.` from compile)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key = key[len(p):]
                    changed = True
        out[key] = value
    return out


def drop_ignored(state: dict[str, torch.Tensor], expected: Sequence[str], patterns: Sequence[str],
                 model: str, source: Path) -> dict[str, torch.Tensor]:
    """`state` without the keys the model lacks that match an ignore_keys pattern.

    Keys the model has are never dropped. A pattern that matches no such key is a
    ManifestError, so a typo cannot pass unnoticed.
    """
    have = set(expected)
    used: dict[str, int] = dict.fromkeys(patterns, 0)
    kept = {}
    for key, value in state.items():
        pattern = None if key in have else next((p for p in patterns if fnmatch.fnmatchcase(key, p)), None)
        if pattern is None:
            kept[key] = value
        else:
            used[pattern] += 1
    unused = [p for p, n in used.items() if n == 0]
    if unused:
        extra = sorted(set(state) - have)
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "") if extra else "none"
        raise ManifestError(
            f"model {model!r}, field 'ignore_keys': {', '.join(map(repr, unused))} matches no key of {source} "
            f"that the model lacks (keys the model lacks: {shown})"
        )
    log.info("%s: ignore_keys dropped %d key(s) of %s: %s", model, len(state) - len(kept), source,
             ", ".join(f"{p} ({n})" for p, n in used.items()))
    return kept


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], model: str, source: Path,
                ignore_keys: Sequence[str] = ()) -> None:
    """Load `state` into `module`; any missing, unexpected or mis-shaped tensor is a WeightsError listing them.

    Keys matching `ignore_keys` that the model lacks are dropped first (see `drop_ignored`).
    """
    state = clean_keys(state)
    expected = module.state_dict()
    if ignore_keys:
        state = drop_ignored(state, list(expected), ignore_keys, model, source)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{title}: {shown}")
        raise WeightsError(
            f"model {model!r}: weights {source} do not fit the manifest's model "
            f"(check arch, encoder, classes, in_channels, arch_params): " + "; ".join(parts)
        )
    module.load_state_dict(state, strict=True)


def read_pretrained_config(folder: Path, model: str) -> dict[str, Any]:
    """The config.json of an smp save_pretrained folder."""
    cfg = folder / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise WeightsError(f"model {model!r}: {folder} has no config.json (not an smp save_pretrained folder)") from err
    except (OSError, ValueError) as err:
        raise WeightsError(f"model {model!r}: cannot read {cfg}: {err}") from err
    if not isinstance(data, dict):
        raise WeightsError(f"model {model!r}: {cfg} is not a JSON object")
    return data
