"""The model side shared by train/ and decode/: the base-model runtime and the exit heads.

The names below load on first use (PEP 562), so that a command's one-line error for bad input comes before
torch and transformers are imported (seconds of a user's time, and of every such test)."""

import importlib

_EXPORTS = {
    "Base": "heads.base",
    "LayerRange": "heads.base",
    "load_base": "heads.base",
    "resolve_model_path": "heads.base",
    "UserError": "heads.errors",
    "ExitHead": "heads.head",
    "build_head": "heads.head",
    "load_head": "heads.head",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'heads' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
