"""Validation of the accuracy-mode fields of a model spec (docs/accuracy.md): tta, resize
letterbox/tile, tile_size, overlap, blend, and ensembles (weights and sha256 lists).

Called from `ModelSpec`'s validators; raises ValueError, which the manifest loader
turns into a ManifestError naming the file, the model and the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legitseg.manifest.safe_yaml import short

if TYPE_CHECKING:
    from legitseg.manifest.spec import ModelSpec

TILE_ONLY = ("tile_size", "overlap", "blend")
TILE_RANGE = (8, 16384)  # as input_size's
# Test-time augmentation views. Each is exact on pixels (no interpolation) and is undone
# on the logits; `flips` is nnU-Net's mirroring of a 2D image (both flips and their product).
TTA_VIEWS = ("hflip", "vflip", "rot90", "rot180", "rot270")
TTA_ALIASES = {"flips": ("hflip", "vflip", "rot180")}


def expand_tta(v: Any) -> Any:
    """`flips` (alone or in a list) expands to its views; unknown or repeated views are refused."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list | tuple):
        return v
    views: list[Any] = []
    for item in v:
        views.extend(TTA_ALIASES.get(item, (item,)) if isinstance(item, str) else (item,))
    for item in views:
        if isinstance(item, str) and item not in TTA_VIEWS:
            raise ValueError(f"unknown view {short(item)}; valid: {', '.join(TTA_VIEWS)} or flips")
    if len(set(map(str, views))) != len(views):
        raise ValueError(f"a view is listed twice in {short(list(v))} (flips = hflip, vflip, rot180)")
    return views


def check_tile_size(v: Any) -> Any:
    """One number or [height, width], each within TILE_RANGE; one number n means [n, n].

    Checked here rather than by the field's type so the message names `tile_size` and the
    value as written, not pydantic's `tile_size.1` of the list a single number became.
    """
    if isinstance(v, bool):
        return v
    pair = [v, v] if isinstance(v, int) else v
    if isinstance(pair, list | tuple) and len(pair) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in pair):
        lo, hi = TILE_RANGE
        if not all(lo <= n <= hi for n in pair):
            raise ValueError(f"tile_size {short(v)} is out of range: one number or [height, width], "
                             f"each {lo}..{hi}")
    return pair


def check_modes(spec: ModelSpec, given: set[str]) -> None:
    if spec.resize == "tile":
        if spec.task != "segmentation":
            raise ValueError("resize 'tile' applies to segmentation models only")
        if spec.tile_size is None:
            raise ValueError("'tile_size' [height, width] (or one number) is required when resize is 'tile'")
        if "input_size" in given:
            # Tiles are cut at tile_size; an input_size would be silently unused.
            raise ValueError("field 'input_size' does not apply to resize 'tile' (the model sees "
                             "'tile_size' tiles); remove it")
    else:
        wrong = [f for f in TILE_ONLY if f in given]
        if wrong:
            raise ValueError(f"field(s) {', '.join(wrong)} only apply to resize 'tile'")
    turns = [v for v in spec.tta if v in ("rot90", "rot270")]
    if turns and spec.resize != "pad" and spec.task == "segmentation" or turns and spec.resize == "letterbox":
        what = "tile_size" if spec.resize == "tile" else "input_size"
        h, w = getattr(spec, what)
        if h != w:
            raise ValueError(f"tta view(s) {', '.join(turns)} need a square {what}, got {[h, w]}: "
                             "a quarter turn would feed the model a different size")


def check_ensemble(spec: ModelSpec) -> None:
    many_w, many_s = isinstance(spec.weights, list), isinstance(spec.sha256, list)
    if many_w != many_s:
        raise ValueError("'weights' and 'sha256' must both be single values or both lists "
                         "(one sha256 per weights file)")
    if not many_w:
        return
    if not spec.weights:
        raise ValueError("'weights' is an empty list")
    if len(spec.weights) != len(spec.sha256):
        raise ValueError(f"'weights' lists {len(spec.weights)} files but 'sha256' has "
                         f"{len(spec.sha256)} values (one per file)")
    if len(set(spec.sha256)) != len(spec.sha256):
        raise ValueError("the same sha256 is listed twice in 'sha256': an ensemble member would count twice")


def with_tta(spec: ModelSpec, on: bool) -> ModelSpec:
    """The spec as --tta (its own views, or flips if it has none) or --no-tta runs it."""
    if not on:
        return spec.model_copy(update={"tta": ()}) if spec.tta else spec
    if spec.tta:
        return spec
    return spec.model_copy(update={"tta": tuple(expand_tta("flips"))})
