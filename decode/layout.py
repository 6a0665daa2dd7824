"""Where each PPSD stage's layers go: stage 0 holds [0, E), the verify stages split [E, N) between them,
balanced by cost (decode/theory.py's `balanced_split`) from per-layer costs this module can measure."""

from __future__ import annotations

import torch

from decode import theory
from decode.common import positions
from decode.stage_layers import check_stage_layers
from heads.errors import UserError
from heads.hardware import median_seconds


def split_layers(num_layers: int, exit_layer: int, stages: int, layer_costs=None, lm_head_cost: float = 0.0,
                 stage_layers=None) -> list[range]:
    """Stage 0 = [0, E); layers [E, N) over stages 1..S-1: `stage_layers` as given (the verify stages'
    [start, end) pairs, optionally with [0, E) first), else balanced by cost (theory.balanced_split:
    uniform layers unless `layer_costs`, the LM head's cost on the last stage)."""
    if stages < 2:
        raise UserError(f"stages={stages}: ppsd needs at least 2 stages (stage 0 drafts, the others verify)")
    if not 1 <= exit_layer < num_layers:
        raise UserError(f"exit_layer={exit_layer} is outside 1..{num_layers - 1}")
    if stages - 1 > num_layers - exit_layer:
        raise UserError(f"stages={stages} leaves a stage empty: exit layer {exit_layer} of {num_layers} leaves "
                        f"{num_layers - exit_layer} layers for {stages - 1} verify stages; use stages<={num_layers - exit_layer + 1}")
    if stage_layers is not None:
        pairs = [tuple(int(x) for x in p) for p in stage_layers]
        if pairs and pairs[0] == (0, exit_layer) and len(pairs) == stages:
            pairs = pairs[1:]
        try:
            check_stage_layers([(0, exit_layer)] + pairs, num_layers, exit_layer, stages)
        except ValueError:
            raise UserError(f"stage_layers={[list(p) for p in pairs]} must be {stages - 1} contiguous non-empty "
                            f"[start, end) ranges covering [{exit_layer}, {num_layers})") from None
        return [range(0, exit_layer)] + [range(a, b) for a, b in pairs]
    costs = [1.0] * num_layers if layer_costs is None else list(layer_costs)
    split = theory.balanced_split(costs, num_layers, exit_layer, stages, lm_head_s=lm_head_cost)
    return [range(a, b) for a, b in split]


@torch.inference_mode()
def measure_costs(base, repeats: int = 7) -> tuple[float, float]:
    """(one decoder layer, final norm + LM head) for one position with a short KV cache, seconds (median)."""
    layer = base.loaded_layers.start
    r = base.range(layer, layer + 1)
    h = torch.randn(1, 16, base.hidden_size, dtype=base.dtype, device=base.device)
    r.forward(h, positions(0, 16, base.device))
    x, pos = h[:, :1], positions(16, 1, base.device)
    layer_s = median_seconds(lambda: r.forward(x, pos), repeats, warmup=1, device=base.device, after=lambda: r.crop(16))
    return layer_s, median_seconds(lambda: base.logits(x), repeats, warmup=1, device=base.device)

