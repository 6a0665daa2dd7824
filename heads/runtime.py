"""The stage runtime every decoder runs on: how a base's layer ranges run, and the ranges themselves.

`Runtime` (one per `Base`, made by `Base.set_runtime`) owns everything that decides how a range of decoder
layers runs: the static caches, the compile policy (mode and options), the padding rows, and the one rule for
"this call is a compiled step". Two ways to run a range, with the same layers (transformers' own modules) and
the same tokens:
- eager: a `DynamicCache` that grows per call and is cropped on a rollback;
- static: a preallocated cache (transformers' `StaticLayer`s), a rollback only moves a length, and the
  attention mask follows that length; with `compile`, each fixed-shape step (1 position, or k ≤ 16
  verified positions) is one `torch.compile`d graph (inductor on a CPU; CUDA graphs on a GPU), captured
  once per process. Prefill (the first call after a reset) always runs eager, on the same static cache.
- batch-invariant (`rows`): every compiled step runs exactly `rows` positions, the real ones padded with
  throw-away ones, so a position's bits never depend on how many positions share its call (bf16 EESD's
  verify pass against AR's one-position steps) while every step stays a captured graph. The padding writes
  cache slots past the real length, which no real query sees and the next real positions overwrite.

A decode loop's whole step (greedy AR's embed → layers → LM head → argmax; a PPSD stage's step) can also be
captured by hand as one `torch.cuda.CUDAGraph` from fixed input buffers to fixed output buffers (`CapturedStep`):
one replay per step, a few µs of host work, no guards and no output clone. On a CPU the same code runs the
step directly.

The static cache of a layer range belongs to the runtime and is reused by every `LayerRange` made for it, so
a compiled graph sees the same buffers from one prompt to the next (a new buffer would mean a new capture).
One `LayerRange` per (start, end) is live at a time: making a new one resets the shared cache.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from heads.cache import MIN_CACHE_LEN, SlotKV, StaticKV, cache_len_for, static_mask, supports_static  # noqa: F401
from heads.compat import configure_compiler, guard_filter, mode_options

from heads.batch_invariant import MAX_ROWS  # decode steps of at most this many positions run compiled, longer ones eager
from heads.hardware import torch_threads

GRAPHS = ("cuda", "host")  # what a CapturedStep replays: CUDA graphs, or their stand-in on a CPU (tests)


def one_thread():
    """Run a CPU prefill on one thread. oneDNN picks its bf16 GEMM kernel by thread count for long inputs (a
    770-row gate projection rounds differently on 1 and 2 threads; a decode step's few rows do not), and the
    methods compared run with different counts (AR on every core, each PPSD stage on its share): one count for
    every prefill keeps their caches, and so their greedy tokens, bit-identical."""
    return torch_threads(1)


def compile_step(fn, mode: str | None, cpu: bool = False):
    """`fn` compiled for fixed shapes. Guards on the layers' weights would be re-checked on every call (most of
    a step's host time); a base's weights never change, so only the arguments are guarded (where torch can
    filter guards). On a CPU inductor's own kernels (norms, rope, activations: a decode step's few rows) run on
    one thread, so their bits cannot depend on a process's thread count (AR and the PPSD stages run with
    different counts). A precaution: the divergence actually measured came from the prefill's GEMMs
    (`one_thread`); GEMMs and attention here are library calls that still use every thread."""
    configure_compiler()  # process-wide settings: the first call sets them, later ones return at once
    # torch.compile refuses `mode` and `options` together: a mode is its inductor options, folded in here
    options = mode_options(mode)
    if guard_filter() is not None:
        options["guard_filter_fn"] = guard_filter()
    if cpu:
        options["cpp.threads"] = 1
    return torch.compile(fn, dynamic=False, options=options)


def layers_then_unpad(base, hidden, start: int, end: int, *, position_ids, cache, pad: torch.Tensor):
    """The compiled step of a padded runtime: `base.run_layers` on `rows` positions, the last `pad` (a 0-d tensor,
    so one graph serves every count) of them padding, then the cache length moved back past the real ones."""
    out = base.run_layers(hidden, start, end, position_ids=position_ids, cache=cache)
    for layer in cache.layers[start:end]:
        layer.cumulative_length.sub_(pad)
    return out


def padded(hidden, position_ids, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden` and its positions padded to `rows` positions: zero hidden states at the positions that follow."""
    pad = rows - hidden.shape[1]
    more = position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device)
    return torch.nn.functional.pad(hidden, (0, 0, 0, pad)), torch.cat([position_ids, more], 1)


class CaptureLog:
    """Every shape a runtime compiled or captured (`keys`) and the seconds spent doing so: shared by a runtime
    and its hand-capture copy, and written by the steps captured on it."""

    def __init__(self):
        self.keys: set = set()
        self.seconds = 0.0

    def add(self, key, seconds: float) -> None:
        self.keys.add(key)
        self.seconds += seconds


@dataclass(frozen=True)
class RuntimeSpec:
    """How a base's layer ranges run: the runtime's part of a run's resolved spec (`decode.spec.RunSpec.runtime`).
    `compile`d steps imply `static` caches; `compile_mode` "auto" is CUDA graphs ("reduce-overhead") on a GPU and
    inductor's default on a CPU; `rows` > 0 pads every compiled step to that many positions (batch-invariant
    compiled steps)."""

    compile: bool = False
    static: bool = False
    compile_mode: str | None = "auto"
    rows: int = 0


class Runtime:
    """How a base's layer ranges run, as its resolved `spec` says: `static` caches (owned here, one per range and row
    count), `compile`d steps in `compile_mode`, padded to `rows` positions. `step_graphs`: greedy AR replays its
    whole step as one hand-captured CUDA graph (`CapturedStep`); off, it calls the compiled layer range (torch's
    own graphs) per token. (PPSD stages on CUDA always capture their step.)"""

    def __init__(self, base=None, spec: RuntimeSpec = RuntimeSpec(compile_mode=None), *, caches: dict | None = None,
                 log: CaptureLog | None = None):
        self.base = base
        self.spec = replace(spec, static=spec.static or spec.compile)
        self.cpu = base is not None and base.device.type == "cpu"
        self.step_graphs = True
        self.caches: dict[tuple[int, int, int], StaticKV] = {} if caches is None else caches
        self.log = log or CaptureLog()
        self.functions: dict = {}   # name -> compiled function
        self.steps: dict = {}       # name -> a decode loop's captured step (made once per runtime)
        self.pads: dict[int, torch.Tensor] = {}  # padded runtime: real count -> padding positions, on the device
        self._for_capture: Runtime | None = None

    static = property(lambda self: self.spec.static)
    compile = property(lambda self: self.spec.compile)
    compile_mode = property(lambda self: self.spec.compile_mode)
    rows = property(lambda self: self.spec.rows)

    @classmethod
    def for_base(cls, base, asked: RuntimeSpec) -> tuple["Runtime", str]:
        """The runtime `asked` for, as far as `base` allows it, and a note when it fell back to eager; its spec is the
        resolved one (a compile mode, never "auto"). With batch-invariant kernels the compiled steps are padded to
        `rows` positions; without `rows`, or static without compile, they stay eager, as do sliding-window
        models."""
        mode = asked.compile_mode
        if mode == "auto":
            mode = "reduce-overhead" if base.device.type == "cuda" else None
        static, compile = asked.static or asked.compile, asked.compile
        ok, why = supports_static(base.config)
        note = ""
        if static and not ok:
            static = compile = False
            note = f"eager ({why}: static caches are not supported)"
        elif static and base.batch_invariant and not (compile and asked.rows > 0):
            static = compile = False
            note = "eager (batch-invariant kernels: compiled steps need a fixed row count)"
        rows = asked.rows if compile and base.batch_invariant else 0
        return cls(base, RuntimeSpec(compile=compile, static=static, compile_mode=mode, rows=rows)), note

    def describe(self) -> str:
        if self.compile:
            return f"compiled static, steps padded to {self.rows} positions" if self.rows else "compiled static"
        return "static" if self.static else "eager"

    @property
    def capture_s(self) -> float:
        """Seconds spent compiling and capturing so far."""
        return self.log.seconds

    @property
    def captured(self) -> set:
        """Every shape compiled or captured so far."""
        return self.log.keys

    @functools.cached_property
    def cuda_graphs(self) -> bool:
        """The compile mode replays CUDA graphs (reduce-overhead, max-autotune), whose outputs the next replay
        overwrites."""
        return bool(self.compile_mode and mode_options(self.compile_mode).get("triton.cudagraphs"))

    def for_capture(self) -> "Runtime":
        """This runtime for steps captured by hand (`CapturedStep`): torch's own CUDA-graph trees assume the
        current stream and cannot run inside another capture, so here the compiled steps are inductor's kernels
        alone. The same caches and capture log, its own compiled functions; one per runtime."""
        if not self.cuda_graphs:
            return self
        if self._for_capture is None:
            self._for_capture = Runtime(self.base, replace(self.spec, compile_mode=None), caches=self.caches,
                                        log=self.log)
        return self._for_capture

    # ---- caches --------------------------------------------------------------------------------------

    def cache(self, start: int, end: int, max_len: int, *, rows: int = 1) -> "StaticKV":
        """The static cache of layer range [start, end) for `rows` sequences, holding at least `max_len`
        positions: made once and reused (a new buffer would mean a new capture), emptied here."""
        cache = self.caches.get((start, end, rows))
        if cache is None or cache.max_len < max_len:
            cache = self.caches[(start, end, rows)] = StaticKV(self.base.num_layers, max_len)
        cache.set_length(0, range(start, end))
        return cache

    def slot_cache(self, rows: int, max_len: int) -> "SlotKV":
        """The continuous batch's cache (train's teacher answers): `rows` independent sequences of `max_len`
        columns, made once per shape and reused, so its compiled step is captured once."""
        key = ("slots", rows, max_len)
        if key not in self.caches:
            self.caches[key] = SlotKV(self.base.num_layers, max_len, rows, self.base.device)
        return self.caches[key]

    # ---- compiled steps ------------------------------------------------------------------------------

    def compiles(self, held: int, count: int) -> bool:
        """Whether a call of `count` positions on a cache that held `held` before it is a compiled step. A prefill
        (the first call after a reset) runs eager whatever its length: every method and stage then prefills alike,
        and a cache is first filled outside a graph (transformers' advice for CUDA graphs). A step longer than the
        padded row count (or MAX_ROWS) runs eager too."""
        return self.compile and held > 0 and count <= (self.rows or MAX_ROWS)

    def compiled(self, name, fn):
        """`fn` compiled for fixed shapes, once per name for this runtime."""
        if name not in self.functions:
            self.functions[name] = compile_step(fn, self.compile_mode, cpu=self.cpu)
        return self.functions[name]

    def call(self, key, fn, *args, **kwargs):
        """Run a compiled step; the first call of a shape `key` compiles (on CUDA, records a graph) and is
        counted as capture time."""
        first = key not in self.log.keys
        begin = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda_graphs and out is not None:
            out = out.clone()  # a CUDA graph's output is overwritten by its next replay; callers keep some (EESD)
        if first:
            if out is not None and out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            self.log.add(key, time.perf_counter() - begin)
        return out

    def run(self, r: "LayerRange", hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One call of layer range `r`: eager on its dynamic cache, or on its static cache, eager or as a compiled
        (padded) step; the range counts the positions."""
        if not self.static:
            return self.base.run_layers(hidden, r.start, r.end, position_ids=position_ids, cache=r.cache)
        count = hidden.shape[1]
        compiled = self.compiles(r.length, count)
        if r.length + max(count, self.rows if compiled else 0) > r.cache.max_len:
            r._grow(r.length + max(count, self.rows))
        if not compiled:
            return self.base.run_layers(hidden, r.start, r.end, position_ids=position_ids, cache=r.cache)
        if not self.rows:
            step = self.compiled("run_layers", self.base.run_layers)
            return self.call((r.start, r.end, count, r.cache.max_len), step, hidden, r.start, r.end,
                             position_ids=position_ids, cache=r.cache)
        # padded outside the compiled step and cut back inside it: every count up to `rows` is one graph
        step = self.compiled("run_padded", functools.partial(layers_then_unpad, self.base))
        if count not in self.pads:
            self.pads[count] = torch.tensor(self.rows - count, device=hidden.device)
        hidden, position_ids = padded(hidden, position_ids, self.rows)
        out = self.call((r.start, r.end, self.rows, r.cache.max_len), step, hidden, r.start, r.end,
                        position_ids=position_ids, cache=r.cache, pad=self.pads[count])
        return out[:, :count]

    def step(self, name: str, make: Callable[[], "CapturedStep"]):
        """A decode loop's captured step, made once per runtime (its graphs are reused from one request to the
        next) by `make()`."""
        if name not in self.steps:
            self.steps[name] = make()
        return self.steps[name]


class HostGraph:
    """A CUDA graph's stand-in on a CPU (tests, and the captured path's host cost there): its replay runs the
    step's kernels, and like a real replay none of its host bookkeeping (the lengths of the step's current ranges)."""

    def __init__(self, step: "CapturedStep"):
        self.step = step

    def replay(self) -> None:
        lengths = [r.length for r in self.step.ranges]
        self.step.fn()
        for r, length in zip(self.step.ranges, lengths):
            r.length = length


class CapturedStep:
    """One decode step from fixed input buffers to fixed output buffers, replayed as a graph captured by hand
    (`torch.cuda.CUDAGraph`, compiled without torch's own graph trees: `Runtime.for_capture`): one replay per
    step, no guards, no output clone. `fn()` reads its inputs from buffers and writes its outputs to others, never
    to its inputs, so the warm-up, the capture and the first replay can all run at one position.

    A graph is captured on the first call of each `key` (the cache it writes: a new buffer means a new capture),
    after a warm-up run that compiles and allocates outside the capture. A replay runs kernels only: the ranges'
    host lengths are moved here by what the warm-up moved them. `graphs`: "cuda", "host" (`HostGraph`, the
    stand-in on a CPU), or None (`fn` runs directly: a CPU). A failed capture is said once; the step then runs
    directly."""

    def __init__(self, fn: Callable[[], None], *, name: str, graphs: str | None = None, stream=None,
                 log: CaptureLog | None = None):
        if graphs not in (None, *GRAPHS):
            raise ValueError(f"graphs={graphs!r}: one of {GRAPHS} or None")
        self.fn, self.name, self.graphs, self.stream, self.log = fn, name, graphs, stream, log
        self.ranges: list = []   # the layer ranges `fn` runs (set per request: a new range over the same cache)
        self.captures: dict = {}  # key -> (graph, how far each range moved)
        self.capture_s = 0.0
        self.error: str | None = None

    def __call__(self, key: Hashable | None = None) -> None:
        """Run the step: replay its graph for `key`, capturing it first; key None (a prefill, a dynamic cache),
        no graphs or a failed capture: `fn` directly."""
        captured = self._captured(key) if key is not None and self.graphs and self.error is None else None
        if captured is None:
            self.fn()
            return
        graph, moves = captured
        graph.replay()
        for r, move in zip(self.ranges, moves):
            r.length += move  # what the step's Python would have counted

    def _captured(self, key):
        if key in self.captures:
            return self.captures[key]
        begin = time.perf_counter()
        logged = self.log.seconds if self.log is not None else 0.0  # the compiles inside log their own time
        lengths = [r.length for r in self.ranges]
        try:
            self.fn()  # compiles (if compiled) and allocates outside the capture
            moves = [r.length - n for r, n in zip(self.ranges, lengths)]
            self._rewind(lengths)
            graph = self._capture()
        except Exception as e:  # noqa: BLE001 - an uncapturable step still runs, only slower
            self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"warning: {self.name} runs uncaptured ({self.error})", flush=True)
            self._rewind(lengths)
            return None
        self._rewind(lengths)  # the capture's Python ran but its kernels did not; the warm-up's is undone
        self.captures[key] = graph, moves
        seconds = time.perf_counter() - begin
        self.capture_s += seconds
        if self.log is not None:
            self.log.add(("graph", self.name, getattr(key, "max_len", None)), seconds - (self.log.seconds - logged))
        return self.captures[key]

    def _rewind(self, lengths: list[int]) -> None:
        for r, length in zip(self.ranges, lengths):
            r.crop(length)

    def _capture(self):
        if self.graphs == "host":
            self.fn()  # what a capture does on the host: the step's Python runs (its lengths are rewound after)
            return HostGraph(self)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.fn()
        return graph


class LayerRange:
    """Layers [start, end) of a base with their own KV cache: the unit every stage and decoder runs. How a call
    runs (eager, static, compiled, padded) is its runtime's decision."""

    def __init__(self, base, start: int, end: int):
        self.base, self.start, self.end = base, start, end
        self.runtime: Runtime = base.runtime
        self.length = 0  # positions held in this range's cache
        self.cache = self.runtime.cache(start, end, MIN_CACHE_LEN) if self.runtime.static else DynamicCache()

    @torch.inference_mode()  # one grad mode for every call: a compiled graph is captured for one
    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run the layers on hidden (B, T, H) at positions `position_ids` (B, T), which must continue the cache."""
        if hidden.shape[1] > MAX_ROWS and hidden.device.type == "cpu":
            with one_thread():  # a prefill: the same bits in every process, whatever its thread count
                out = self.runtime.run(self, hidden, position_ids)
        else:
            out = self.runtime.run(self, hidden, position_ids)
        self.length += hidden.shape[1]
        return out

    def reserve(self, length: int) -> None:
        """Room for `length` positions, and a padded step's rows past them, before a captured step is replayed
        (a graph cannot grow a cache)."""
        if self.runtime.static and length + self.runtime.rows > self.cache.max_len:
            self._grow(length + self.runtime.rows)

    @torch.inference_mode()
    def _grow(self, length: int) -> None:
        """A longer sequence than the cache holds: a bigger cache (and new captures), the valid part copied."""
        old = self.cache
        self.cache = self.runtime.cache(self.start, self.end, cache_len_for(length))
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
