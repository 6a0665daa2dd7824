"""`Decoder`: the library API over the three decode loops.

    with Decoder(method="ppsd", head_path="heads/smollm2-e8", stages=2) as dec:
        gen = dec.generate(prompt_ids, max_new_tokens=128)      # -> Generation
        for token in dec.stream(prompt_ids, max_new_tokens=128):  # tokens as they are verified
            ...

Every setting is resolved once into a frozen RunSpec (decode/spec.py): the keywords make one, and
`Decoder.from_spec(spec, method, base=, head=)` starts a decoder from one resolved elsewhere (python -m decode
resolves one spec for all its methods). For ppsd the Decoder starts the S-1 verify stages once (spawned
processes, or the other torchrun ranks) and reuses them for every request; `close()` (or leaving the `with`) stops them. Where its stages run is
`placement` (`resolve_placement`): CUDA streams of one GPU or the GPUs of this node, driven by this process
(decode/local.py), or stage processes (decode/pipeline.py).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from decode.ar import ar_decode
from decode.common import Decoding, Generation
from decode.eesd import eesd_decode
from decode.local import LocalPipeline
from decode.pipeline import Pipeline
from decode.ppsd import ppsd_decode
from decode.protocol import PipelineError
from decode.spec import (RunSpec, check_exact_base, decode_threads, padded_rows, resolve_base_model,  # noqa: F401
                         resolve_device, resolve_placement, resolve_spec)
from heads import load_base
from heads.errors import UserError
from heads.hardware import torch_threads
from heads.sampling import Sampling
from heads.schema import METHODS


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
        other.set_runtime(base.runtime.spec)  # stage 0's, resolved
        bases.append(other)
    return bases


class Decoder:
    """One method (ar | eesd | ppsd) bound to a base model and (for eesd/ppsd) an exit head."""

    def __init__(self, method: str = "ar", head_path: str | None = None, *, model: str | None = None, base=None,
                 head=None, stages: int = 2, stage_layers=None, gamma: int = 4, dtype: str = "float32",
                 threads: int | None = None, stage_threads: int = 1, window: int | None = None,
                 timeout_s: float = 30.0, worker_timeout_s: float = 3600.0, device: str = "cpu",
                 exit_layer: int | None = None, batch_invariant: bool | None = None, compile: bool = False,
                 placement: str = "auto"):
        """The keyword API: the settings as given (an `auto` is resolved as the CLI resolves it; threads=None is
        torch's current count), made into a RunSpec and started as `from_spec` starts it."""
        spec, base, head = resolve_spec(
            methods=[method], head_path=head_path, model=model, base=base, head=head, device=device, dtype=dtype,
            compile=compile, batch_invariant=batch_invariant, threads=threads, stage_threads=stage_threads,
            stages=stages, stage_layers=stage_layers, gamma=gamma, window=window, placement=placement,
            timeout_s=timeout_s, worker_timeout_s=worker_timeout_s)
        self._start(spec, method, base, head, exit_layer)

    @classmethod
    def from_spec(cls, spec: RunSpec, method: str, *, base=None, head=None, exit_layer: int | None = None) -> "Decoder":
        """`method` as `spec` says, on `base` (default: loaded from spec.model_path) with `head` (eesd, ppsd)."""
        decoder = cls.__new__(cls)
        decoder._start(spec, method, base, head, exit_layer)
        return decoder

    def _start(self, spec: RunSpec, method: str, base, head, exit_layer: int | None) -> None:
        if method not in METHODS:
            raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
        if method != "ar" and head is None:
            raise UserError(f"method={method} needs an exit head: pass head_path=FOLDER_OR_HUB_ID")
        if method == "ppsd" and not spec.layout:
            raise UserError("method=ppsd needs a stage layout: resolve the spec with ppsd among its methods")
        self.spec, self.method = spec, method
        self.pipeline = None   # stage processes (placement=processes)
        self.local = None      # or stages driven by this process (placement=streams | devices)
        self.watched: list = []  # pipelines checked between tokens (evaluate.run: every ppsd decoder's)
        self.last_generation: Generation | None = None
        if base is None:
            base = load_base(spec.model_path, dtype=spec.dtype, device=spec.device,
                             batch_invariant=spec.batch_invariant)
        elif spec.batch_invariant != base.batch_invariant:
            base.set_batch_invariant(spec.batch_invariant)  # a shared base: every method on it computes the same way
        if spec.compile != base.runtime.compile or spec.rows != base.runtime.rows:  # a shared base keeps its graphs
            runtime = base.set_runtime(spec.runtime)
            if spec.compile and not base.runtime.compile:
                print(f"compile=true: the base runs {runtime}", flush=True)
        self.base, self.head = base, head
        self.exit_layer = head.exit_layer if head is not None else exit_layer
        self.stop_ids = base.eos_token_ids
        if method == "ppsd" and spec.placement == "processes":
            self.pipeline = Pipeline(spec, hidden_size=base.hidden_size, vocab_size=base.vocab_size,
                                     spawn=not dist.is_initialized())
        elif method == "ppsd":
            bases = stage_bases(base, self.layout, stage_devices(base.device, spec.stages, spec.placement))
            self.local = LocalPipeline(spec, bases, head)

    # the spec's settings, as this decoder uses them
    gamma = property(lambda self: self.spec.gamma)
    window = property(lambda self: self.spec.window)
    threads = property(lambda self: self.spec.threads)
    stage_threads = property(lambda self: self.spec.stage_threads)

    @property
    def placement(self) -> str | None:
        return self.spec.placement if self.method == "ppsd" else None

    @property
    def layout(self) -> list[range] | None:
        return [range(a, b) for a, b in self.spec.layout] if self.method == "ppsd" else None

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
                                       window=self.spec.window, **common)
                watched = [p for p in (self.watched or [self.pipeline]) if p is not None]
                decoding, start, first_token_s = Decoding(loop), time.perf_counter(), None
                try:
                    for token in decoding:
                        first_token_s = first_token_s or time.perf_counter() - start
                        for pipeline in watched:
                            pipeline.check_alive()
                        yield token
                finally:
                    loop.close()
                self.last_generation = decoding.result
                self.last_generation.first_token_s = first_token_s
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
