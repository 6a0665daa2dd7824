"""Lossless fast decoding with an exit head: ar (baseline), eesd (draft-then-verify) and ppsd
(pipeline-parallel self-speculative decoding). `python -m decode` evaluates them on Spec-Bench-format prompts; `TextDecoder` takes and returns text."""

from decode.common import Generation, OracleDrafts
from decode.decoder import Decoder
from decode.layout import split_layers
from decode.protocol import PipelineError
from decode.text import TextDecoder

__all__ = ["Decoder", "Generation", "OracleDrafts", "PipelineError", "TextDecoder", "split_layers"]
