"""The stage runtime every decoder runs on: a range of decoder layers with its own KV cache.

Two ways to run a range, with the same layers (transformers' own modules) and the same tokens:
- eager: a `DynamicCache` that grows per call and is cropped on a rollback;
- static: a preallocated cache (transformers' `StaticLayer`s), a rollback only moves a length, and the
  attention mask follows that length; with `compile`, each fixed-shape step (1 position, or k ≤ 16
  verified positions) is one `torch.compile`d graph (inductor on a CPU; CUDA graphs on a GPU), captured
  once per process. Prefill (the first call after a reset) always runs eager, on the same static cache.
- batch-invariant (`rows`): every compiled step runs exactly `rows` positions, the real ones padded with
  throw-away ones, so a position's bits never depend on how many positions share its call (bf16 EESD's
  verify pass against AR's one-position steps) while every step stays a captured graph. The padding writes
  cache slots past the real length, which no real query sees and the next real positions overwrite.

The static cache of a layer range belongs to the `Base` and is reused by every `LayerRange` made for it, so
a compiled graph sees the same buffers from one prompt to the next (a new buffer would mean a new capture).
One `LayerRange` per (start, end) is live at a time: making a new one resets the shared cache.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from heads.compat import configure_compiler, guard_filter, mark_static, mode_options, static_layer_supported

from heads.batch_invariant import MAX_ROWS  # decode steps of at most this many positions run compiled, longer ones eager
from heads.hardware import torch_threads

MIN_CACHE_LEN = 256


def one_thread():
    """Run a CPU prefill on one thread. oneDNN picks its bf16 GEMM kernel by thread count for long inputs (a
    770-row gate projection rounds differently on 1 and 2 threads; a decode step's few rows do not), and the
    methods compared run with different counts (AR on every core, each PPSD stage on its share): one count for
    every prefill keeps their caches, and so their greedy tokens, bit-identical."""
    return torch_threads(1)


def cache_len_for(length: int) -> int:
    """Cache capacity for `length` positions: the next power of two (so a longer prompt rarely recaptures)."""
    return max(MIN_CACHE_LEN, 1 << max(0, length - 1).bit_length())


def compile_step(fn, mode: str | None, cpu: bool = False):
    """`fn` compiled for fixed shapes. Guards on the layers' weights would be re-checked on every call (most of
    a step's host time); a base's weights never change, so only the arguments are guarded (where torch can
    filter guards). On a CPU inductor's own kernels (norms, rope, activations: a decode step's few rows) run on
    one thread, so their bits cannot depend on a process's thread count (AR and the PPSD stages run with
    different counts). A precaution: the divergence actually measured came from the prefill's GEMMs
    (`one_thread`); GEMMs and attention here are library calls that still use every thread."""
    configure_compiler()
    # torch.compile refuses `mode` and `options` together: a mode is its inductor options, folded in here
    options = mode_options(mode)
    if guard_filter() is not None:
        options["guard_filter_fn"] = guard_filter()
    if cpu:
        options["cpp.threads"] = 1
    return torch.compile(fn, dynamic=False, options=options)


@dataclass
class RuntimeSettings:
    """How a base's layer ranges run: `static` caches, `compile`d steps (implies static)."""

    static: bool = False
    compile: bool = False
    compile_mode: str | None = None           # torch.compile mode (None: inductor's default)
    cpu: bool = False                         # the base runs on a CPU (inductor's C++ kernels)
    rows: int = 0                             # > 0: every compiled step padded to this many positions
    capture_s: float = 0.0                    # time spent compiling/capturing so far
    captured: set = field(default_factory=set)
    functions: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.compile:
            return f"compiled static, steps padded to {self.rows} positions" if self.rows else "compiled static"
        return "static" if self.static else "eager"

    @functools.cached_property
    def cuda_graphs(self) -> bool:
        """The compile mode replays CUDA graphs (reduce-overhead, max-autotune), whose outputs the next replay
        overwrites."""
        return bool(self.compile_mode and mode_options(self.compile_mode).get("triton.cudagraphs"))

    def compiled(self, name, fn):
        """`fn` compiled for fixed shapes, once per name for this runtime."""
        if name not in self.functions:
            self.functions[name] = compile_step(fn, self.compile_mode, cpu=self.cpu)
        return self.functions[name]

    def call(self, key, fn, *args, **kwargs):
        """Run a compiled step; the first call of a shape `key` compiles (on CUDA, records a graph) and is
        counted as capture time."""
        first = key not in self.captured
        begin = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda_graphs and out is not None:
            out = out.clone()  # a CUDA graph's output is overwritten by its next replay; callers keep some (EESD)
        if first:
            if out is not None and out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            self.capture_s += time.perf_counter() - begin
            self.captured.add(key)
        return out


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


class LayerRange:
    """Layers [start, end) of a base with their own KV cache: the unit every stage and decoder runs."""

    def __init__(self, base, start: int, end: int):
        self.base, self.start, self.end = base, start, end
        self.runtime: RuntimeSettings = base.runtime
        self.length = 0  # positions held in this range's cache
        self.cache = base.static_cache(start, end, MIN_CACHE_LEN) if self.runtime.static else DynamicCache()

    @torch.inference_mode()  # one grad mode for every call: a compiled graph is captured for one
    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run the layers on hidden (B, T, H) at positions `position_ids` (B, T), which must continue the cache."""
        if hidden.shape[1] > MAX_ROWS and hidden.device.type == "cpu":
            with one_thread():  # a prefill: the same bits in every process, whatever its thread count
                return self._forward(hidden, position_ids)
        return self._forward(hidden, position_ids)

    def _forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        count = hidden.shape[1]
        if not self.runtime.static:
            out = self.base.run_layers(hidden, self.start, self.end, position_ids=position_ids, cache=self.cache)
        else:
            rows = self.runtime.rows
            # A prefill (the first call after a reset) runs eager whatever its length: every method and stage then
            # prefills alike, and a cache is first filled outside a graph (transformers' advice for CUDA graphs).
            compiled = self.runtime.compile and self.length > 0 and count <= (rows or MAX_ROWS)
            if self.length + max(count, rows if compiled else 0) > self.cache.max_len:
                self._grow(self.length + max(count, rows))
            if compiled:
                key = (self.start, self.end, count, self.cache.max_len)
                step = self.runtime.compiled("run_layers", self.base.run_layers_padded)
                out = self.runtime.call(key, step, hidden, self.start, self.end, position_ids=position_ids,
                                        cache=self.cache, rows=rows)
            else:
                out = self.base.run_layers(hidden, self.start, self.end, position_ids=position_ids, cache=self.cache)
        self.length += count
        return out

    @torch.inference_mode()
    def _grow(self, length: int) -> None:
        """A longer sequence than the cache holds: a bigger cache (and new captures), the valid part copied."""
        old = self.cache
        self.cache = self.base.static_cache(self.start, self.end, cache_len_for(length))
        for i in [*range(self.start, self.end), len(old.layers) - 1]:
            src, dst = old.layers[i], self.cache.layers[i]
            if src.is_initialized:
                dst.lazy_initialization(src.keys[:, :, :1], src.values[:, :, :1])
                dst.keys[:, :, :self.length] = src.keys[:, :, :self.length]
                dst.values[:, :, :self.length] = src.values[:, :, :self.length]
                dst.cumulative_length.fill_(self.length)

    def crop(self, length: int) -> None:
        """Roll back to `length` positions (a rejected draft, a flush)."""
        if length >= self.length:
            return
        if self.runtime.static:
            self.cache.set_length(length, range(self.start, self.end))
        else:
            for layer in self.cache.layers:
                if getattr(layer, "is_initialized", False):
                    extra = layer.get_seq_length() - length
                    if extra > 0:
                        layer.crop(-extra)
        self.length = length

    def reset(self) -> None:
        if self.runtime.static:
            self.crop(0)
        else:
            self.cache = DynamicCache()
        self.length = 0
