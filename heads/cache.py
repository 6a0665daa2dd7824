"""The static KV caches the runtime (heads/runtime.py) runs layer ranges on, and whether a base can use them.

`StaticKV`: transformers' `StaticLayer`s, preallocated; a rollback only moves a length (a tensor, moved in place,
since a captured graph holds its address). `SlotKV`: the continuous batch's cache, each row its own sequence.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from heads.compat import mark_static, static_layer_supported

MIN_CACHE_LEN = 256


def cache_len_for(length: int) -> int:
    """Cache capacity for `length` positions: the next power of two (so a longer prompt rarely recaptures)."""
    return max(MIN_CACHE_LEN, 1 << max(0, length - 1).bit_length())


def supports_static(config) -> tuple[bool, str]:
    """Whether this base can run on static caches: every attention layer must be full attention (a sliding
    window cache is a ring buffer a rollback cannot move back) and transformers' static layers must keep their
    length in a tensor."""
    ok, why = static_layer_supported()
    if not ok:
        return False, why
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        return False, f"{config.model_type} uses sliding-window attention"
    if any(t not in ("full_attention",) for t in layer_types):
        return False, f"{config.model_type} has layer types {sorted(set(layer_types))}"
    return True, ""


class StaticKV(Cache):
    """transformers' static layers for a base's N layers + one slot for a transformer exit head, allocated
    on first use with the batch, heads, dtype and device of what is written."""

    def __init__(self, num_layers: int, max_len: int):
        from transformers.cache_utils import StaticLayer  # present where static_layer_supported() says so

        super().__init__(layers=[StaticLayer(max_cache_len=max_len) for _ in range(num_layers + 1)])
        self.max_len = max_len

    @torch.inference_mode()  # the buffers are inference tensors when a decoder allocated them
    def set_length(self, length: int, layers: range) -> None:
        """Positions [0, length) are valid in `layers` (and the head slot): a rollback, or a reset to 0."""
        for i in [*layers, len(self.layers) - 1]:
            layer = self.layers[i]
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)  # in place: a compiled graph holds this tensor's address


class SlotKV(StaticKV):
    """A static cache whose rows are independent sequences (continuous batching): row b writes its next
    positions at its own columns `columns[b]`, so a finished row is refilled with a new prompt (copied into
    columns [0, length)) while the others go on, and every step keeps one shape. A query sees its row's
    columns up to its own (the caller's mask); columns past it hold stale values no query sees."""

    def __init__(self, num_layers: int, max_len: int, rows: int, device):
        super().__init__(num_layers, max_len)
        self.columns = torch.zeros(rows, 1, dtype=torch.long, device=device)  # in place: a graph holds its address
        self.row_index = torch.arange(rows, device=device)[:, None]
        mark_static(self.columns)
        mark_static(self.row_index)

    def allocate(self, heads: int, head_dim: int, dtype, device) -> None:
        """Every layer's buffers, before a prefill is copied in."""
        example = torch.zeros(len(self.columns), heads, 1, head_dim, dtype=dtype, device=device)
        for layer in self.layers[:-1]:
            if not layer.is_initialized:
                layer.lazy_initialization(example, example)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        # (B, H, T, D) written at (row b, column columns[b] + t): advanced indices first, so (B, T, H, D)
        columns = self.columns + torch.arange(key_states.shape[2], device=self.columns.device)
        layer.keys[self.row_index, :, columns] = key_states.transpose(1, 2)
        layer.values[self.row_index, :, columns] = value_states.transpose(1, 2)
        return layer.keys, layer.values


def static_mask(position_ids: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, 1, T, max_len) bool: query at position p sees cache slots [0, p]; slots past the length are stale."""
    slots = torch.arange(max_len, device=position_ids.device)
    return slots[None, None, None, :] <= position_ids[:, None, :, None]
