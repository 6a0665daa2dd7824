"""Lossless fast decoding with an exit head: ar (baseline), eesd (draft-then-verify) and ppsd
(pipeline-parallel self-speculative decoding). `python -m decode` evaluates them on Spec-Bench-format prompts; `TextDecoder` takes and returns text.

The names below load on first use (PEP 562): `python -m decode` checks its options before torch is imported."""

from heads.lazy import lazy_exports

_EXPORTS = {
    "Decoder": "decode.decoder",
    "Generation": "decode.common",
    "OracleDrafts": "decode.common",
    "PipelineError": "decode.protocol",
    "TextDecoder": "decode.text",
    "split_layers": "decode.layout",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
