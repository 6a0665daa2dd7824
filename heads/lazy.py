"""Package names that load on first use (PEP 562): a command's one-line error for bad input comes before torch
and transformers are imported."""

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` for `package` that imports `exports[name]` (a module path) on first use of `name`."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(exports[name]), name)
    return __getattr__
