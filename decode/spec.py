"""One run's settings, every `auto` resolved once: `RunSpec`, built by `resolve_spec` on rank 0 after the options
are checked, then handed unchanged to the Decoder, the Pipeline and every stage (a spawned stage as its spawn
argument, a torchrun rank as JSON after its LAYOUT message: decode/pipeline.py).

    spec, base, head = resolve_spec(methods=["ar", "ppsd"], head_path="heads/smollm2-e8", threads="auto")
    spec.reasons   # {"threads": "2: fastest of {1: 9.1, 2: 6.3} ms per AR step", ...}: why each auto became what it did

Resolution needs the base (threads are measured on it, the stage layout is balanced by its layer costs), so the
base and head load inside `resolve_spec`, between the settings they need and the ones they decide.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from decode.layout import measure_costs, split_layers
from heads.base import DEFAULT_MODEL, EMBEDDED_MODELS, identity_source, parse_dtype
from heads.errors import UserError
from heads.hardware import (check_device, cores, fastest_threads, is_auto, native_bf16, process_threads,
                            resolve_compile, resolve_dtype, thread_candidates)
from heads.head import read_head_config
from heads.runtime import RuntimeSpec
from heads.schema import METHODS, PLACEMENTS, check_gamma


@dataclass(frozen=True)
class RunSpec:
    """Every resolved setting of one run: what the Decoder, the Pipeline and each stage compute with."""

    model_path: str                 # the base's folder, as loaded
    device: str                     # rank 0's device (a torchrun rank on CUDA uses its own GPU: `stage_device`)
    dtype: str
    threads: int                    # ar / eesd / a stage driven by this process
    stage_threads: int              # each ppsd stage process, rank 0 included
    compile: bool = False           # static caches and compiled steps (heads/runtime.py)
    batch_invariant: bool = False
    rows: int = 0                   # batch-invariant compiled steps: their fixed position count (0: none)
    gamma: int = 4
    window: int | None = None       # ppsd: positions in flight
    placement: str | None = None    # ppsd: processes | streams | devices
    layout: tuple[tuple[int, int], ...] = ()  # ppsd: stage i holds layers [layout[i][0], layout[i][1])
    timeout_s: float = 30.0         # rank 0's deadline on each stage message
    worker_timeout_s: float = 3600.0  # a stage's deadline on each message once it serves
    load_timeout_s: float = 600.0   # a stage's time to load its layers (torchrun: to receive this spec)
    reasons: dict = field(default_factory=dict, compare=False)  # setting -> "value: why", for each auto
    threads_measured_ms: dict = field(default_factory=dict, compare=False)  # threads=auto: ms per AR step by count

    @property
    def stages(self) -> int:
        return len(self.layout) or 1

    @property
    def runtime(self) -> RuntimeSpec:
        """How every base of this run runs its layer ranges (heads.runtime.Runtime)."""
        return RuntimeSpec(compile=self.compile, rows=self.rows)

    def layers(self, stage: int) -> range:
        return range(*self.layout[stage])

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "RunSpec":
        values = json.loads(data)
        return cls(**values | {"layout": tuple(tuple(pair) for pair in values["layout"]),
                               "threads_measured_ms": {int(n): ms for n, ms in values["threads_measured_ms"].items()}})


# ---- the settings a base needs before it loads ---------------------------------------------------

def resolve_base_model(head_path: str | None, model: str | None) -> str:
    """The base to load: `model` if given, else exactly the base the head records (an embedded copy by its
    name, a hub id pinned to its commit, a folder); never another one, e.g. the original weights of an
    embedded quantized copy. A head without that record (older ppsd): a one-line error saying what to pass."""
    if model:
        return model
    if head_path is None:
        return DEFAULT_MODEL
    config = read_head_config(head_path)
    identity = config.get("base")
    if identity is None:
        named = config["base_model"]
        guess = next((f"model={name} (the embedded {e.quantization} copy)" for name, e in EMBEDDED_MODELS.items()
                      if e.origin == named), f"model={named}")
        raise UserError(f"head '{head_path}' does not record the exact base it was trained on (it names {named}; "
                        f"written by an older ppsd): pass the base it was trained on, e.g. {guess}, or retrain it")
    if not isinstance(identity.get("id"), str) or not isinstance(identity.get("sha256"), str):
        raise UserError(f"head '{head_path}': its config.json's base is {json.dumps(identity)[:80]}, not "
                        "{id, sha256, ...}: the file is damaged; re-export or retrain the head")
    return identity_source(identity)


def check_exact_base(head, base) -> None:
    """The head's recorded base has the loaded base's weights (sha256), or a one-line error. A head without
    the record was loaded on the base the caller named (model=): nothing to check."""
    recorded = head.base_identity
    if recorded is None or recorded.get("sha256") == base.identity["sha256"]:
        return
    raise UserError(f"head trained on {recorded['id']} (sha256 {recorded['sha256'][:12]}) but the base loaded is "
                    f"{base.identity['id']} (sha256 {base.identity['sha256'][:12]}): decode on the base it was trained "
                    "on (leave model= unset to load it)")


def resolve_device(requested: str | None) -> str:
    """Where this process puts the base and head. Under torchrun (WORLD_SIZE > 1) "auto" (or null) and
    "cuda" mean this rank's GPU, cuda:LOCAL_RANK, when CUDA is available; a single process with "auto" takes
    the GPU when there is one, else the CPU."""
    requested = "auto" if requested is None else str(requested)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def padded_rows(compile: bool, batch_invariant: bool, gamma: int) -> int:
    """The fixed position count of batch-invariant compiled steps: EESD's longest verify pass, γ + 1 (every
    method on a base, and every PPSD stage, must use the same)."""
    return gamma + 1 if compile and batch_invariant else 0


def wants_batch_invariant(value, dtype: str, matched: list[str]) -> tuple[bool, str]:
    """auto: on when eesd is among the methods whose tokens must match ar's and the dtype is below fp32 (its
    multi-position verify pass would round differently from ar's one-position steps; fp32 matched in every run
    here). Returns (on, why)."""
    if not is_auto(value):
        return bool(value), "asked for"
    if parse_dtype(dtype) == torch.float32:
        return False, "float32: every method rounds alike"
    if "eesd" not in matched:
        return False, "no eesd to match ar"
    return True, f"{dtype}: eesd's verify pass would round differently from ar's steps"


# ---- the settings measured on the loaded base ----------------------------------------------------

def decode_threads(base, prompt_ids: list[int], threads, stage_threads, stages: int = 1) -> dict:
    """Resolve `threads` (ar / eesd; None: torch's current count) and `stage_threads` (each ppsd stage process).
    auto: `threads` is the count measured fastest for one AR step of this base on this machine (all cores is
    not always fastest), and a stage gets that many but at most its share of the cores. On a GPU threads only
    feed the host side: keep torch's default. Returns {threads, stage_threads, measured_ms, reasons}."""
    from decode.ar import repeatable_step

    measured, reasons = {}, {}
    if threads is None:
        threads = torch.get_num_threads()
    elif not is_auto(threads):
        threads = process_threads(threads)
    elif base.device.type != "cpu":
        threads = torch.get_num_threads()
        reasons["threads"] = f"{threads}: torch's default (on {base.device.type} threads only feed the host)"
    else:
        threads, timings = fastest_threads(repeatable_step(base, prompt_ids[:64]), thread_candidates())
        measured = {n: round(t * 1e3, 3) for n, t in timings.items()}
        reasons["threads"] = f"{threads}: fastest of {measured} ms per AR step"
    if stage_threads is None or is_auto(stage_threads):
        stage_threads = min(threads, max(1, cores() // max(1, stages)))
        reasons["stage_threads"] = f"{stage_threads}: threads, at most {cores()} cores / {stages} stages"
    else:
        stage_threads = process_threads(stage_threads)
    return {"threads": threads, "stage_threads": stage_threads, "measured_ms": measured, "reasons": reasons}


def resolve_placement(placement: str, device: str | torch.device, stages: int, torchrun: bool = False) -> str:
    """Where ppsd's stages run. auto: stage processes on a CPU (each its own threads) and under torchrun (the
    ranks are the stages); on CUDA one process drives them: on GPUs i..i+S-1 of this node when there are that
    many (`devices`), else on streams of one GPU (`streams`)."""
    return placement_and_reason(placement, device, stages, torchrun)[0]


def placement_and_reason(placement: str, device: str | torch.device, stages: int,
                         torchrun: bool = False) -> tuple[str, str]:
    if placement not in PLACEMENTS:
        raise UserError(f"placement={placement}: use one of {', '.join(PLACEMENTS)}")
    device = torch.device(device)
    gpus = torch.cuda.device_count() - (device.index or 0) if device.type == "cuda" else 0  # from `device` on
    if placement == "auto":
        if torchrun:
            return "processes", "torchrun: the ranks are the stages"
        if device.type != "cuda":
            return "processes", f"{device.type}: each stage a process with its own threads"
        if gpus >= stages > 1:
            return "devices", f"{gpus} GPUs from {device} for {stages} stages"
        return "streams", f"{gpus} GPU(s) from {device} for {stages} stages: one GPU, a stream each"
    if torchrun and placement != "processes":
        raise UserError(f"placement={placement} drives every stage from one process: under torchrun use "
                        "placement=processes (the ranks are the stages), or run one process without torchrun")
    if placement == "devices" and device.type == "cuda" and gpus < stages:
        raise UserError(f"placement=devices puts stage i on GPU i: {stages} stages need {stages} GPUs from {device}, "
                        f"this node has {torch.cuda.device_count()}; use placement=streams (one GPU) or fewer stages")
    return placement, "asked for"


def stage_layout(base, exit_layer: int, stages: int, stage_layers=None) -> list[range]:
    """Stage 0 = [0, E); [E, N) over the verify stages, `stage_layers` as given or balanced by measured cost."""
    layer_s, lm_head_s = measure_costs(base)
    return split_layers(base.num_layers, exit_layer, stages, layer_costs=[layer_s] * base.num_layers,
                        lm_head_cost=lm_head_s, stage_layers=stage_layers)


def ppsd_settings(base, head, stages: int, stage_layers, placement: str, window: int | None) -> dict:
    """ppsd's stage layout (balanced by measured cost unless given), placement and window: {layout, placement,
    window, reasons}."""
    layout = tuple((r.start, r.stop) for r in stage_layout(base, head.exit_layer, stages, stage_layers))
    where, why = placement_and_reason(placement, base.device, len(layout), torch.distributed.is_initialized())
    reasons = {"placement": f"{where}: {why}"} if is_auto(placement) else {}
    if stage_layers is None:
        reasons["layout"] = f"{[list(p) for p in layout]}: [E, N) balanced by measured layer and LM-head costs"
    if window is None:
        window = len(layout)  # S keeps every stage busy (decode/ppsd.py: default_window)
        reasons["window"] = f"{window}: one position in flight per stage"
    return {"layout": layout, "placement": where, "window": window, "reasons": reasons}


# ---- the one function that builds it -------------------------------------------------------------

def base_settings(*, methods: list[str], device="auto", dtype="auto", compile="auto", batch_invariant="auto",
                  matched=None, gamma: int = 4, base=None, quiet: bool = True) -> dict:
    """The settings the base loads with (`base`, when given, is loaded: its device and dtype are the facts):
    {device, dtype, compile, batch_invariant, reasons}. batch_invariant=None: a given base's own, else off."""
    reasons: dict[str, str] = {}
    if base is None:
        chosen = str(check_device(resolve_device(device)))
        if is_auto(device):
            reasons["device"] = f"{chosen}: " + ("this rank's GPU" if os.environ.get("LOCAL_RANK") and
                                                 torch.cuda.is_available() else
                                                 "CUDA is available" if torch.cuda.is_available() else "no CUDA")
        device = chosen
        chosen = resolve_dtype(dtype, device, quiet=quiet)
        if is_auto(dtype):
            reasons["dtype"] = f"{chosen}: {native_bf16(torch.device(device).type)[1]}"
        dtype = chosen
    else:
        device, dtype = str(base.device), str(base.dtype).removeprefix("torch.")
    chosen = resolve_compile(compile, device, quiet=quiet)
    if is_auto(compile):
        reasons["compile"] = f"{str(chosen).lower()}: " + ("CUDA graphs remove per-call host overhead" if chosen else
                                                           "a CPU: capture costs more than it saves per run")
    compile = chosen
    if batch_invariant is None:
        batch_invariant = base.batch_invariant if base is not None else False
    elif is_auto(batch_invariant):
        batch_invariant, why = wants_batch_invariant(batch_invariant, dtype, list(matched or methods))
        reasons["batch_invariant"] = f"{str(batch_invariant).lower()}: {why}"
    if batch_invariant and "eesd" in methods:
        check_gamma(gamma)
    return {"device": device, "dtype": dtype, "compile": compile, "batch_invariant": bool(batch_invariant),
            "reasons": reasons}


def resolve_spec(*, methods: list[str], head_path: str | None = None, model: str | None = None, base=None,
                 head=None, device="auto", dtype="auto", compile="auto", batch_invariant="auto", matched=None,
                 threads="auto", stage_threads="auto", stages: int = 2, stage_layers=None, gamma: int = 4,
                 window: int | None = None, placement: str = "auto", timeout_s: float = 30.0,
                 worker_timeout_s: float = 3600.0, probe=None, quiet: bool = True):
    """Resolve every setting of a run of `methods` on one base, once: what the base loads with (`base_settings`;
    a given `base` is used as it is, its batch invariance set to the resolved one), then the head (when a method
    drafts), threads (measured on `probe`: token ids, or a function of the base that returns them), the ppsd
    layout and placement. `matched`: the methods whose greedy tokens must match ar's (default `methods`: what
    batch_invariant=auto looks at). Returns (RunSpec, base, head)."""
    from heads import load_base, load_head  # the stages import this module too: keep heads' loaders lazy

    for method in methods:
        if method not in METHODS:
            raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if gamma < 1:
        raise UserError(f"gamma={gamma}: eesd drafts at least one token per round")
    drafts = any(m != "ar" for m in methods)
    if drafts and head is None and head_path is None:
        raise UserError(f"method={next(m for m in methods if m != 'ar')} needs an exit head: pass "
                        "head_path=FOLDER_OR_HUB_ID")
    settings = base_settings(methods=methods, device=device, dtype=dtype, compile=compile,
                             batch_invariant=batch_invariant, matched=matched, gamma=gamma, base=base, quiet=quiet)
    reasons = settings.pop("reasons")
    if base is None:
        base = load_base(resolve_base_model(head_path, model), dtype=settings["dtype"], device=settings["device"],
                         batch_invariant=settings["batch_invariant"])
        settings["dtype"] = str(base.dtype).removeprefix("torch.")  # its canonical name, as the stages load it
    elif settings["batch_invariant"] != base.batch_invariant:
        base.set_batch_invariant(settings["batch_invariant"])  # a shared base: every method computes the same way
    if drafts and head is None:
        head = load_head(head_path, base)
        check_exact_base(head, base)
    probe = probe(base) if callable(probe) else probe or list(range(100, 120))
    counts = decode_threads(base, probe, threads, stage_threads, stages)
    reasons |= counts["reasons"]
    ppsd = {"window": window}
    if "ppsd" in methods:
        ppsd = ppsd_settings(base, head, stages, stage_layers, placement, window)
        reasons |= ppsd.pop("reasons")
    spec = RunSpec(model_path=str(base.folder), threads=counts["threads"], stage_threads=counts["stage_threads"],
                   rows=padded_rows(settings["compile"], settings["batch_invariant"], gamma), gamma=gamma,
                   timeout_s=timeout_s, worker_timeout_s=worker_timeout_s, reasons=reasons,
                   threads_measured_ms=counts["measured_ms"], **settings, **ppsd)
    return spec, base, head
