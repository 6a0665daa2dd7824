"""Lossless fast decoding with an exit head: ar (baseline), eesd (draft-then-verify) and ppsd
(pipeline-parallel self-speculative decoding). `python -m decode` evaluates them on Spec-Bench-format prompts."""

from decode.common import Generation, OracleDrafts
from decode.decoder import Decoder
from decode.layout import split_layers
from decode.protocol import PipelineError

__all__ = ["Decoder", "Generation", "OracleDrafts", "PipelineError", "split_layers"]
