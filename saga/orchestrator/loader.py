"""Find the user's saga registry from ``SAGA_DEFINITIONS=module:attribute``."""

from __future__ import annotations

import importlib
import os
import sys

from saga.core.definition import Registry
from saga.core.errors import ConfigError

__all__ = ["load_registry"]


def load_registry(path: str) -> Registry:
    """Import ``module:attribute``; the attribute is a Registry or a callable returning one.

    The current directory is searched first, as ``python -m`` would: a project's own
    ``myapp/sagas.py`` is found without setting PYTHONPATH.
    """
    if ":" not in path:
        raise ConfigError(
            f"SAGA_DEFINITIONS={path!r}: expected module:attribute, e.g. myapp.sagas:registry"
        )
    module_name, attr = path.split(":", 1)
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"SAGA_DEFINITIONS: cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"SAGA_DEFINITIONS: {module_name!r} has no attribute {attr!r}")
    registry = target() if callable(target) and not isinstance(target, Registry) else target
    if not isinstance(registry, Registry):
        raise ConfigError(f"SAGA_DEFINITIONS: {path} is not a saga.Registry")
    return registry
