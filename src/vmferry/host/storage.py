"""Storage roots: every VM file lives under one, and nothing escapes them."""

from __future__ import annotations

import os
from pathlib import Path

from vmferry.errors import OutsideStorageRootError, RefusedError


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_under_roots(value: str, roots: list[str], field: str) -> Path:
    """Resolve ``value`` (absolute, or relative to the first root) to a path inside a root.

    Refuses ``..`` components, symlinks anywhere on the path, and anything outside the roots.
    """
    if not roots:
        raise RefusedError(
            "this host has no storage roots",
            field="storage_roots",
            fix="add one: ferry host set --add-storage-root DIR",
        )
    if not value or "\x00" in value:
        raise RefusedError(f"{field} is empty", field=field, fix="give a directory name")
    raw = Path(value)
    if ".." in raw.parts:
        raise OutsideStorageRootError(
            f"{field} {value!r} contains '..'", field=field, fix="give a path without '..'"
        )
    candidate = Path(os.path.normpath(raw if raw.is_absolute() else Path(roots[0]) / raw))
    root_paths = [Path(os.path.normpath(r)) for r in roots]
    root = next((r for r in root_paths if _is_within(candidate, r)), None)
    if root is None:
        raise OutsideStorageRootError(
            f"{field} {value!r} is outside this host's storage roots",
            field=field,
            fix="use a path under " + ", ".join(roots),
        )
    # No component below the root may be a symlink (it could point anywhere).
    probe = candidate
    while probe != root:
        if probe.is_symlink():
            raise OutsideStorageRootError(
                f"{field} {value!r} goes through the symlink {probe}",
                field=field,
                fix="use a real directory under the storage root",
            )
        probe = probe.parent
    return candidate
