"""Parameter containers: an array, or nested dicts/lists/tuples of arrays (via ``optree``)."""

from __future__ import annotations

import optree

__all__ = ["flatten", "unflatten", "leaf_paths", "check_same_structure"]


def flatten(tree):
    """Return ``(leaves, treespec)``; a bare array is a tree with one leaf."""
    return optree.tree_flatten(tree)


def unflatten(treespec, leaves):
    return optree.tree_unflatten(treespec, list(leaves))


def leaf_paths(tree) -> list[str]:
    """Human-readable path of each leaf, e.g. ``"['encoder'][0]"``; ``""`` for a bare array."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    out = []
    for path in paths:
        out.append("".join(f"[{k!r}]" for k in path))
    return out


def check_same_structure(name: str, tree, reference_spec) -> list:
    """Flatten ``tree`` and check it has the structure ``reference_spec``.

    Raises:
        ValueError: the structures differ; the message names ``name`` and both structures.
    """
    leaves, spec = optree.tree_flatten(tree)
    if spec != reference_spec:
        raise ValueError(
            f"{name} has structure {spec} but the optimizer state was built for {reference_spec}"
        )
    return leaves
