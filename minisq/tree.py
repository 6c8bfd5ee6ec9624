"""The parameter tree: nested dicts and lists under the checkpoint's own names, with
swappable linear leaves (see :mod:`minisq.nn`). Walking, reading and replacing nodes.

Nothing here changes a tree in place: ``replace_param``, ``_map`` and ``_map_arrays`` return
new trees that share every node they do not replace.
"""

from __future__ import annotations

import dataclasses


def is_linear_leaf(node) -> bool:
    """True for the swappable linear leaves of the parameter tree (anything callable that is
    not a container or array)."""
    return callable(node) and not isinstance(node, (dict, list, tuple)) and not hasattr(node, "shape")


def _walk(node, prefix: str):
    # yields (dotted name, leaf) for every linear leaf below node
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _walk(child, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{prefix}{i}.")
    elif is_linear_leaf(node):
        yield prefix[:-1], node


def _map(node, fn, prefix: str):
    # a new tree where every linear leaf is replaced by fn(name, leaf); arrays are shared
    if isinstance(node, dict):
        return {key: _map(child, fn, f"{prefix}{key}.") for key, child in node.items()}
    if isinstance(node, list):
        return [_map(child, fn, f"{prefix}{i}.") for i, child in enumerate(node)]
    if is_linear_leaf(node):
        return fn(prefix[:-1], node)
    return node


def get_param(params, dotted: str):
    """The node at a dotted name of a parameter tree, e.g. ``get_param(p, "h.0.ln_1")``."""
    node = params
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def replace_param(params, dotted: str, value):
    """A new tree with the node at ``dotted`` replaced by ``value``. The containers along
    the path are copied, everything else is shared: the input tree is not changed."""
    head, _, rest = dotted.partition(".")
    if isinstance(params, list):
        out = list(params)
        i = int(head)
        out[i] = replace_param(params[i], rest, value) if rest else value
        return out
    out = dict(params)
    out[head] = replace_param(params[head], rest, value) if rest else value
    return out


def _map_arrays(node, fn):
    # apply fn to every array of the tree, rebuilding dataclass leaves field by field
    if isinstance(node, dict):
        return {k: _map_arrays(v, fn) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_map_arrays(v, fn) for v in node)
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return fn(node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _map_arrays(getattr(node, f.name), fn) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    return node
