"""Lossless fast decoding with an exit head: ar (baseline), eesd (draft-then-verify) and ppsd
(pipeline-parallel self-speculative decoding). `python -m decode` evaluates them on Spec-Bench-format prompts; `TextDecoder` takes and returns text.

The names below load on first use (PEP 562): `python -m decode` checks its options before torch is imported."""

import importlib

_EXPORTS = {
    "Decoder": "decode.decoder",
    "Generation": "decode.common",
    "OracleDrafts": "decode.common",
    "PipelineError": "decode.protocol",
    "TextDecoder": "decode.text",
    "split_layers": "decode.layout",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'decode' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
