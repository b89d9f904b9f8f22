"""Path checks that keep every mount inside the directories the admin allowed.

Two checks, at two moments: `relative_path` rejects a parameter lexically when the request is
parsed (absolute, `..`, empty parts); `resolve_inside` resolves symlinks right before a mount
and refuses a result outside the root, so a link planted in the shared filesystem cannot point
a bind mount at the node's own files.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from strategies.errors import InvalidArgument


def relative_path(value: str, *, field: str) -> PurePosixPath:
    """Validate a path parameter that must stay below its root; '' and '.' mean the root itself."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL bytes")
    if value.startswith("/"):
        raise InvalidArgument(field, f"{value!r} must be relative to its root, not absolute")
    path = PurePosixPath(value)
    if any(part == ".." for part in path.parts):
        raise InvalidArgument(field, f"{value!r} must not contain '..'")
    return path


def resolve_inside(root: Path, relative: PurePosixPath, *, field: str) -> Path:
    """The real path of `root/relative`, refusing one that a symlink leads out of `root`.

    Blocking (it touches the filesystem): call through run_blocking.
    """
    real_root = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(real_root / relative))
    if candidate != real_root and not candidate.is_relative_to(real_root):
        raise InvalidArgument(
            field, f"{str(relative)!r} resolves to {candidate}, outside its root {root}"
        )
    return candidate


def check_target(target: Path, allowed: tuple[Path, ...], *, field: str) -> Path:
    """A publish target must be absolute and below one of the allowed target directories."""
    # On strings (one Path made, not three): this runs on every publish and unpublish.
    text = os.fspath(target)
    if not text.startswith("/"):
        raise InvalidArgument(field, f"{target} must be an absolute path")
    if ".." in text.split("/"):
        raise InvalidArgument(field, f"{target} must not contain '..'")
    normal_text = os.path.normpath(text)
    normal = Path(normal_text)
    if allowed and not any(_strictly_below(normal_text, os.fspath(base)) for base in allowed):
        bases = ", ".join(str(base) for base in allowed)
        raise InvalidArgument(
            field, f"{target} is outside the allowed target directories ({bases})"
        )
    return normal


def _strictly_below(path: str, base: str) -> bool:
    """`Path(path).is_relative_to(base) and path != base`, for normalized absolute strings."""
    if path.startswith("//") or base.startswith("//"):  # POSIX's own "//" root: pathlib's rules
        return Path(path).is_relative_to(base) and Path(path) != Path(base)
    if path == base:
        return False
    return path.startswith(base if base.endswith("/") else base + "/")
