"""`Decoder`: the library API over the three decode loops.

    with Decoder(method="ppsd", head_path="heads/smollm2-e8", stages=2) as dec:
        gen = dec.generate(prompt_ids, max_new_tokens=128)      # -> Generation
        for token in dec.stream(prompt_ids, max_new_tokens=128):  # tokens as they are verified
            ...

For ppsd the Decoder starts the S-1 verify stages once (spawned processes, or the other torchrun
ranks) and reuses them for every request; `close()` (or leaving the `with`) stops them. Where its stages run is
`placement` (`resolve_placement`): CUDA streams of one GPU or the GPUs of this node, driven by this process
(decode/local.py), or stage processes (decode/pipeline.py).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from decode.ar import ar_decode, repeatable_step
from decode.common import Generation
from decode.eesd import eesd_decode
from decode.layout import measure_costs, split_layers
from decode.local import LocalPipeline
from decode.pipeline import Pipeline
from decode.ppsd import ppsd_decode
from decode.protocol import PipelineError
from heads import load_base, load_head
from heads.base import DEFAULT_MODEL, EMBEDDED_MODELS, identity_source
from heads.errors import UserError
from heads.hardware import cores, fastest_threads, is_auto, process_threads, thread_candidates, torch_threads
from heads.head import read_head_config
from heads.sampling import Sampling
from heads.schema import METHODS, PLACEMENTS


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


def resolve_placement(placement: str, device: str | torch.device, stages: int, torchrun: bool = False) -> str:
    """Where ppsd's stages run. auto: stage processes on a CPU (each its own threads) and under torchrun (the
    ranks are the stages); on CUDA one process drives them: on GPUs i..i+S-1 of this node when there are that
    many (`devices`), else on streams of one GPU (`streams`)."""
    if placement not in PLACEMENTS:
        raise UserError(f"placement={placement}: use one of {', '.join(PLACEMENTS)}")
    device = torch.device(device)
    gpus = torch.cuda.device_count() - (device.index or 0) if device.type == "cuda" else 0  # from `device` on
    if placement == "auto":
        if torchrun or device.type != "cuda":
            return "processes"
        return "devices" if gpus >= stages > 1 else "streams"
    if torchrun and placement != "processes":
        raise UserError(f"placement={placement} drives every stage from one process: under torchrun use "
                        "placement=processes (the ranks are the stages), or run one process without torchrun")
    if placement == "devices" and device.type == "cuda" and gpus < stages:
        raise UserError(f"placement=devices puts stage i on GPU i: {stages} stages need {stages} GPUs from {device}, "
                        f"this node has {torch.cuda.device_count()}; use placement=streams (one GPU) or fewer stages")
    return placement


def stage_devices(device: str | torch.device, stages: int, placement: str) -> list[torch.device]:
    """Stage i's device: GPU first + i with placement=devices, else `device` for every stage."""
    device = torch.device(device)
    if placement != "devices" or device.type != "cuda":
        return [device] * stages
    return [torch.device("cuda", (device.index or 0) + i) for i in range(stages)]


def stage_bases(base, layout, devices: list[torch.device]) -> list:
    """One Base per stage: `base` itself for stage 0 and every stage on its device; a stage on another device
    loads only its layers (and, the last, the final norm and LM head) there, computing as `base` does."""
    dtype = str(base.dtype).removeprefix("torch.")
    bases = [base]
    for i, (layers, device) in enumerate(zip(layout[1:], devices[1:]), start=1):
        if device == base.device:
            bases.append(base)
            continue
        other = load_base(str(base.folder), dtype=dtype, device=device, layers=layers, embedding=False,
                          lm_head=i == len(layout) - 1, batch_invariant=base.batch_invariant)
        other.set_runtime(compile=base.runtime.compile, rows=base.runtime.rows)
        bases.append(other)
    return bases


def decode_threads(base, prompt_ids: list[int], threads, stage_threads, stages: int = 1) -> dict:
    """Resolve `threads` (ar / eesd) and `stage_threads` (each ppsd stage process). auto: `threads` is the count
    measured fastest for one AR step of this base on this machine (all cores is not always fastest), and a
    stage gets that many but at most its share of the cores. On a GPU threads only feed the host side: keep
    torch's default. Returns {threads, stage_threads, measured_ms: {threads: ms per AR step}}."""
    measured = {}
    if not (threads is None or is_auto(threads)):
        threads = process_threads(threads)
    elif base.device.type != "cpu":
        threads = torch.get_num_threads()
    else:
        threads, timings = fastest_threads(repeatable_step(base, prompt_ids[:64]), thread_candidates())
        measured = {n: round(t * 1e3, 3) for n, t in timings.items()}
    if stage_threads is None or is_auto(stage_threads):
        stage_threads = min(threads, max(1, cores() // max(1, stages)))
    else:
        stage_threads = process_threads(stage_threads)
    return {"threads": threads, "stage_threads": stage_threads, "measured_ms": measured}


def padded_rows(compile: bool, batch_invariant: bool, gamma: int) -> int:
    """The fixed position count of batch-invariant compiled steps: EESD's longest verify pass, γ + 1 (every
    method on a base, and every PPSD stage, must use the same)."""
    return gamma + 1 if compile and batch_invariant else 0


class Decoder:
    """One method (ar | eesd | ppsd) bound to a base model and (for eesd/ppsd) an exit head."""

    def __init__(self, method: str = "ar", head_path: str | None = None, *, model: str | None = None, base=None,
                 head=None, stages: int = 2, stage_layers=None, gamma: int = 4, dtype: str = "float32",
                 threads: int | None = None, stage_threads: int = 1, window: int | None = None,
                 timeout_s: float = 30.0, worker_timeout_s: float = 3600.0, device: str = "cpu",
                 exit_layer: int | None = None, batch_invariant: bool | None = None, compile: bool = False,
                 placement: str = "auto"):
        if method not in METHODS:
            raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
        self.method, self.gamma, self.window = method, gamma, window
        self.threads = threads or torch.get_num_threads()
        self.stage_threads = stage_threads
        self.pipeline = None   # stage processes (placement=processes)
        self.local = None      # or stages driven by this process (placement=streams | devices)
        self.placement = None
        self.watched: list = []  # pipelines checked between tokens (evaluate.run: every ppsd decoder's)
        self.last_generation: Generation | None = None
        if gamma < 1:
            raise UserError(f"gamma={gamma}: eesd drafts at least one token per round")
        if method != "ar" and head is None and head_path is None:
            raise UserError(f"method={method} needs an exit head: pass head_path=FOLDER_OR_HUB_ID")
        device = resolve_device(device)
        if base is None:
            base = load_base(resolve_base_model(head_path, model), dtype=dtype, device=device,
                             batch_invariant=bool(batch_invariant))
        elif batch_invariant is not None and batch_invariant != base.batch_invariant:
            base.set_batch_invariant(batch_invariant)  # a shared base: every method on it computes the same way
        rows = padded_rows(compile, base.batch_invariant, gamma)
        if compile != base.runtime.compile or rows != base.runtime.rows:  # a shared base keeps its captured graphs
            runtime = base.set_runtime(compile=compile, rows=rows)
            if compile and not base.runtime.compile:
                print(f"compile=true: the base runs {runtime}", flush=True)
        self.base = base
        if method != "ar" and head is None:
            head = load_head(head_path, base)
            check_exact_base(head, base)
        self.head = head
        self.exit_layer = head.exit_layer if head is not None else exit_layer
        self.stop_ids = base.eos_token_ids
        self.layout = None
        if method == "ppsd":
            layer_s, lm_head_s = measure_costs(base)
            self.layout = split_layers(base.num_layers, head.exit_layer, stages,
                                       layer_costs=[layer_s] * base.num_layers, lm_head_cost=lm_head_s,
                                       stage_layers=stage_layers)
            torchrun = dist.is_initialized()
            self.placement = resolve_placement(placement, base.device, len(self.layout), torchrun)
            if self.placement == "processes":
                stage_dtype = str(base.dtype).removeprefix("torch.")  # the stages compute exactly as this base does
                self.pipeline = Pipeline(str(base.folder), stage_dtype, self.layout, spawn=not torchrun,
                                         stage_threads=stage_threads, timeout_s=timeout_s,
                                         worker_timeout_s=worker_timeout_s, device=device,
                                         vocab_size=base.vocab_size, hidden_size=base.hidden_size,
                                         batch_invariant=base.batch_invariant, compile=base.runtime.compile,
                                         rows=base.runtime.rows)
            else:
                devices = stage_devices(base.device, len(self.layout), self.placement)
                bases = stage_bases(base, self.layout, devices)
                self.local = LocalPipeline(bases, head, [(r.start, r.stop) for r in self.layout], self.placement)

    def warm_up(self, prompt_ids: list[int], tokens: int, longest: int = 0, **kwargs) -> None:
        """First calls allocate and capture graphs: keep them out of the timings. On a static runtime the prompt is
        stretched to `longest` positions (the longest sequence the timed answers reach), so every cache, the PPSD
        stages' too, has its final size before them (a bigger cache means new graphs)."""
        if self.base.runtime.static and longest > len(prompt_ids) + tokens:
            prompt_ids = (prompt_ids * (longest // len(prompt_ids) + 1))[:longest - tokens]
        if tokens > 0:
            self.generate(prompt_ids, tokens, **kwargs)
        if self.local is not None:  # what one tick costs, each stage alone and together: theory's inputs
            with torch_threads(self.threads):  # as the decode loop runs (stream sets the same count)
                self.local.measure_ticks(prompt_ids[-64:])

    @property
    def stages(self) -> int:
        return len(self.layout) if self.layout else 1

    def stream(self, prompt_ids: list[int], max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, oracle=None, stop_at_eos: bool = True):
        """Yield new token ids as they are verified; afterwards `self.last_generation` holds the Generation.
        temperature / top_p / top_k: heads.sampling.Sampling (the same processed distribution in draft and verify)."""
        sampling = Sampling(temperature, top_p, top_k)
        self.base.check_prompt_length(len(prompt_ids), max_new_tokens)
        if not prompt_ids:
            raise UserError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if oracle is not None and not sampling.greedy:
            raise UserError("oracle drafts are a greedy-decoding instrument: use temperature=0")
        if oracle is not None and self.method == "ar":
            raise UserError("oracle drafts need a drafting method (eesd or ppsd)")
        stop = self.stop_ids if stop_at_eos else frozenset()
        common = dict(sampling=sampling, seed=seed, stop_ids=stop)
        with torch_threads(self.stage_threads if self.pipeline is not None else self.threads):
            try:
                if self.method == "ar":
                    loop = ar_decode(self.base, prompt_ids, max_new_tokens, **common)
                elif self.method == "eesd":
                    loop = eesd_decode(self.base, self.head, prompt_ids, max_new_tokens, gamma=self.gamma,
                                       oracle=oracle, **common)
                elif self.local is not None:
                    loop = self.local.decode(prompt_ids, max_new_tokens, oracle=oracle, **common)
                else:
                    if self.pipeline is None or self.pipeline.closed:
                        raise UserError("this ppsd Decoder is closed: create a new one")
                    loop = ppsd_decode(self.base, self.head, self.pipeline, prompt_ids, max_new_tokens, oracle=oracle,
                                       window=self.window, **common)
                watched = [p for p in (self.watched or [self.pipeline]) if p is not None]
                start, first_token_s = time.perf_counter(), None
                try:
                    while True:
                        token = next(loop)
                        first_token_s = first_token_s or time.perf_counter() - start
                        for pipeline in watched:
                            pipeline.check_alive()
                        yield token
                except StopIteration as stop_iteration:
                    self.last_generation = stop_iteration.value
                    self.last_generation.first_token_s = first_token_s
                finally:
                    loop.close()
            except PipelineError:
                for pipeline in [self.pipeline, *self.watched]:  # a dead or hung stage: leave nothing behind
                    if pipeline is not None:
                        pipeline.kill()
                raise

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 128, **kwargs) -> Generation:
        for _ in self.stream(prompt_ids, max_new_tokens, **kwargs):
            pass
        return self.last_generation

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.pipeline is not None and isinstance(exc[1], PipelineError):
            self.pipeline.kill()
        else:
            self.close()

    def __del__(self):
        try:
            if self.pipeline is not None and not self.pipeline.closed:
                self.pipeline.kill()
        except Exception:
            pass
