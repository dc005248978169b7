"""Object names: the one rule every name given to a store must follow."""

from __future__ import annotations

from uploader.errors import ConfigError

__all__ = ["check_object_name"]


def check_object_name(name: str) -> str:
    """Object names are relative, normalised, and never climb out of the prefix."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        raise ConfigError(f"object name {name!r} must be a relative path like 'run/rank_0/ep1.pt'")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts) or "" in parts or "\x00" in name:
        raise ConfigError(
            f"object name {name!r} must not contain '..', '.', empty segments "
            "or NUL; use a plain relative path"
        )
    return name
