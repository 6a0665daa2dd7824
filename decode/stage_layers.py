"""What a PPSD stage layout must be: the one check, shared by the stage splitting (decode/layout.py) and
the cost model (decode/theory.py). Plain integers, no torch."""

from __future__ import annotations

from collections.abc import Sequence


def check_stage_layers(stage_layers: Sequence[Sequence[int]], num_layers: int, exit_layer: int, stages: int) -> None:
    """ValueError unless `stage_layers` is one [start, end) per stage: contiguous, non-empty, stage 0 holding
    [0, exit_layer) and the last stage ending at layer `num_layers`."""
    if len(stage_layers) != stages:
        raise ValueError(f"stage_layers has {len(stage_layers)} ranges for {stages} stages")
    if tuple(stage_layers[0]) != (0, exit_layer):
        raise ValueError(f"stage 0 must hold layers [0, {exit_layer}), got {tuple(stage_layers[0])}")
    for (a, b), (c, _) in zip(stage_layers, stage_layers[1:]):
        if b != c or a >= b:
            raise ValueError(f"stage_layers {list(stage_layers)} are not contiguous non-empty ranges")
    if stage_layers[-1][1] != num_layers or stage_layers[-1][0] >= num_layers:
        raise ValueError(f"the last stage must end at layer {num_layers}")
