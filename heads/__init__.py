"""The model side shared by train/ and decode/: the base-model runtime and the exit heads.

The names below load on first use (PEP 562), so that a command's one-line error for bad input comes before
torch and transformers are imported (seconds of a user's time, and of every such test)."""

from heads.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
