"""Reading a manifest's YAML safely: no Python tags, no duplicate keys, no alias bombs.

Everything here works on PyYAML's node tree, before any Python object is built,
so a hostile document is refused before it can cost memory or time. Nothing here
imports torch.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from legitseg.errors import ManifestError

# A real manifest (dozens of models, anchors for shared settings) has a few hundred
# nodes and a handful of aliases; these bounds leave room for far larger ones while
# a "billion laughs" document (9 aliases nested 9 deep: 10^9 nodes) is refused.
MAX_ALIASES = 1000
MAX_NODES = 100_000
# Longest value echoed back in an error message.
ECHO_LIMIT = 200


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` cut to `limit` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)`, cut to `limit` characters with "..." so that no message grows with the input.

    The repr of a shared (aliased) structure can be exponentially long; reprlib
    bounds the work, not only the result.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict = 4, 12, 12, 12
    r.maxstring = r.maxother = limit
    return clip(r.repr(value), limit)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one) and alias bombs."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):  # noqa: D102 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ManifestError(
                    f"more than {MAX_ALIASES} YAML aliases (*name), the last at line {mark.line + 1}; "
                    "a manifest needs a few at most"
                )
        return super().compose_node(parent, index)

    def construct_document(self, node):  # noqa: D102 - PyYAML hook
        # Both checks run on the node tree, where each alias is one shared node: the
        # size of the expanded document is counted without expanding it, and the path
        # to each key is known, so a message can name the model and field.
        _expanded_size(node, {}, set())
        _refuse_duplicate_keys(node, (), set())
        return super().construct_document(node)


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes the document would have with every alias copied out; ManifestError past MAX_NODES."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ManifestError(f"recursive YAML alias at line {node.start_mark.line + 1} (a value contains itself)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_NODES:
            raise ManifestError(
                f"the YAML expands to more than {MAX_NODES} values through aliases (*name) "
                f"(from line {node.start_mark.line + 1}); refused as an alias bomb"
            )
    active.discard(key)
    memo[key] = size
    return size


def _refuse_duplicate_keys(node: yaml.Node, where: tuple[str, ...], visited: set[int]) -> None:
    if id(node) in visited:  # an alias to a node already checked
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _refuse_duplicate_keys(child, where, visited)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if key is not None and key in first_line:
            shown = short(key)
            if where == ():
                what = f"duplicate top-level key {shown}"
            elif where == ("models",):
                what = f"duplicate model name {shown}"
            elif len(where) >= 2 and where[0] == "models":
                inner = short(".".join(where[2:]))
                model = short(where[1])
                what = (f"model {model}, field {inner}: duplicate key {shown}" if len(where) > 2
                        else f"model {model}: duplicate field {shown}")
            else:
                what = f"field {short('.'.join(where))}: duplicate key {shown}"
            raise ManifestError(f"{what} at line {line} (first at line {first_line[key]})")
        if key is not None:
            first_line[key] = line
        _refuse_duplicate_keys(value_node, (*where, str(key)), visited)


def load_yaml(text: str) -> Any:
    """Parse manifest text into plain Python values. Raises ManifestError (without the file name)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except ManifestError:
        raise
    except yaml.constructor.ConstructorError as err:
        raise ManifestError(
            f"unsupported YAML tag at line {err.problem_mark.line + 1} "
            f"({clip(str(err.problem), 300)}); manifests are plain YAML, Python tags are refused"
        ) from err
    except yaml.YAMLError as err:
        raise ManifestError(f"not valid YAML: {clip(str(err), 1000)}") from err
    except RecursionError as err:
        raise ManifestError("the YAML is nested too deeply") from err


def non_finite(value: Any, where: tuple[str, ...] = ()) -> tuple[tuple[str, ...], float] | None:
    """The path to and value of the first NaN or infinity in parsed YAML, or None.

    Called only on documents that passed the size checks, so the walk is bounded.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, child in items:
        found = non_finite(child, (*where, str(key)))
        if found:
            return found
    return None
