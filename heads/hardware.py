"""What `auto` means on this machine: the device, the compute dtype and the thread count every entry point
resolves before it loads a model, each printed once and recorded in its outputs.

- dtype auto: bf16 where the hardware multiplies bf16 natively (CUDA GPUs that support it; CPUs with
  avx512_bf16 or AMX), fp32 elsewhere: on an AVX2-only CPU a bf16 GEMM is emulated and several times
  slower than fp32. When the CPU's flags cannot be read, a tiny timed GEMM decides.
- threads auto: for a decode baseline, the thread count measured fastest on the real step (more threads
  are not always faster for a small model); for a training process, its share of the cores.
- device: `cuda` needs a CUDA build of torch and a visible GPU; torchrun with NCCL needs one GPU per rank.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from heads.errors import UserError

AUTO = "auto"


def is_auto(value) -> bool:
    return str(value).lower() == AUTO


# ---------------------------------------------------------------- device


def check_device(device: str | torch.device) -> torch.device:
    """A device string that this machine can run, or a one-line error saying what to pass instead."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device={device} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"device={device} but CUDA is not available ({why}): use device=cpu, or install a "
                            "CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={device} but this machine has {torch.cuda.device_count()} GPU(s): "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "meta"):
        raise UserError(f"device={device} is not supported: use cpu, cuda or cuda:N")
    return device


def check_ranks_fit_gpus() -> None:
    """torchrun on CUDA: NCCL refuses two ranks on one GPU, so a node needs a GPU per local rank."""
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; WORLD_SIZE spans nodes, so it can't tell
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    local_world = int(local) if local else int(os.environ.get("LOCAL_RANK", "0")) + 1
    gpus = torch.cuda.device_count()
    if torch.cuda.is_available() and local_world > gpus:
        raise UserError(f"torchrun started {local_world} processes on this node but it has {gpus} GPU(s), and NCCL "
                        f"needs one GPU per rank: use --nproc_per_node {gpus} (one GPU runs ppsd as spawned "
                        "stages: python -m decode method=ppsd device=cuda)")


# ---------------------------------------------------------------- dtype


@functools.cache
def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((l for l in text.splitlines() if l.startswith(("flags", "Features"))), None)
    return set(line.split(":", 1)[1].split()) if line else None


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count is `n` inside the block and what it was after it (an exception included)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _bf16_gemm_speedup(rows: int = 128, k: int = 576, n: int = 1536, reps: int = 5) -> float:
    """fp32 time / bf16 time of a decode-sized GEMM on one thread (> 1: bf16 is faster)."""
    times = {}
    with torch_threads(1):
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            times[dtype] = time.perf_counter() - start
    return times[torch.float32] / times[torch.bfloat16]


@functools.cache
def native_bf16(device_type: str) -> tuple[bool, str]:
    """(does this device multiply bf16 natively, why we think so)."""
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    if device_type != "cpu":
        return False, f"{device_type} is not a CUDA or CPU device"
    flags, capability = _cpu_flags(), torch.backends.cpu.get_cpu_capability()
    if flags is not None and "avx2" in flags:  # x86: bf16 needs the flags, and kernels allowed to use them
        bf16 = flags & {"avx512_bf16", "amx_bf16"}
        if bf16 and capability.startswith("AVX512"):
            return True, f"the CPU has {'/'.join(sorted(bf16))}"
        if bf16:  # e.g. ATEN_CPU_CAPABILITY=avx2 caps torch's kernels below the bf16 instructions
            return False, f"torch's CPU kernels are capped at {capability}, so bf16 matmuls are emulated"
        return False, "the CPU has no avx512_bf16 or amx_bf16, so bf16 matmuls are emulated"
    ratio = _bf16_gemm_speedup()  # other CPUs (e.g. Arm, or flags unreadable): measure
    return ratio > 1.0, f"a bf16 GEMM ran {ratio:.2f}x the speed of fp32 on this CPU"


def resolve_dtype(value, device: str | torch.device = "cpu", *, name: str = "dtype", quiet: bool = False):
    """`auto` -> "bfloat16" where native, else "float32"; anything else (a dtype, or null) is returned unchanged
    (an explicit bf16 where it is emulated gets a printed warning: it runs, slowly)."""
    if not is_auto(value):
        if str(value) in ("bfloat16", "bf16") and not quiet and torch.device(device).type == "cpu":
            native, why = native_bf16("cpu")
            if not native:
                print(f"warning: {name}={value} on this CPU is slow ({why}): {name}=auto picks float32 here", flush=True)
        return value
    native, why = native_bf16(torch.device(device).type)
    chosen = "bfloat16" if native else "float32"
    if not quiet:
        print(f"{name}=auto -> {chosen} ({why})", flush=True)
    return chosen


def resolve_compile(value, device: str | torch.device = "cpu", *, quiet: bool = False) -> bool:
    """`compile`: run decode steps as captured graphs on static caches (heads/runtime.py). auto: on for CUDA,
    where a step is otherwise bound by per-call host work; off on a CPU, where inductor's capture takes
    minutes for a modest gain per step (see the runtime benchmark: python -m scripts.overhead)."""
    if not is_auto(value):
        return bool(value)
    on = torch.device(device).type == "cuda"
    if not quiet:
        why = "CUDA graphs remove per-call host overhead" if on else "a CPU: capture costs more than it saves per run"
        print(f"compile=auto -> {str(on).lower()} ({why})", flush=True)
    return on


# ---------------------------------------------------------------- threads


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_candidates(limit: int | None = None) -> list[int]:
    """1, 2, 4, ... up to `limit` (default: every core), and `limit` itself."""
    limit = max(1, limit or cores())
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def median_seconds(call: Callable[[], object], repeats: int, *, warmup: int = 0, device=None,
                   after: Callable[[], object] | None = None) -> float:
    """The median wall time of `call` over `repeats` timed calls, after `warmup` untimed ones: the one timing loop
    of every measurement here. On CUDA the device is synchronized around each call (kernels are asynchronous);
    `after` runs untimed after each call (e.g. rolling a cache back)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return sorted(times)[len(times) // 2]


def fastest_threads(step: Callable[[], object], candidates: list[int], repeats: int = 6) -> tuple[int, dict[int, float]]:
    """Time `step` (a representative unit of work, e.g. one decode step) under each thread count; the fastest
    (by the median of `repeats` runs, after one warm-up) and every median measured, in seconds."""
    timings = {}
    for n in candidates:
        with torch_threads(n):
            timings[n] = median_seconds(step, repeats, warmup=1)
    return min(timings, key=timings.get), timings


def process_threads(value, processes: int = 1) -> int:
    """A training/stage process's threads: explicit, or `auto` (null) = its share of the cores."""
    if not (value is None or is_auto(value)):
        n = int(value)
        if n < 1:
            raise UserError(f"threads={value} must be >= 1 (or auto)")
        return n
    return max(1, cores() // max(1, processes))

