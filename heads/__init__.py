"""The model side shared by train/ and decode/: the base-model runtime and the exit heads."""

from heads.base import Base, LayerRange, load_base, resolve_model_path
from heads.errors import UserError
from heads.head import ExitHead, build_head, load_head

__all__ = [
    "Base",
    "LayerRange",
    "load_base",
    "resolve_model_path",
    "UserError",
    "ExitHead",
    "build_head",
    "load_head",
]
