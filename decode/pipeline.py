"""The PPSD pipeline over torch.distributed: messages, the verify-stage worker loop, stage layout,
and rank 0's handle on the other stages (spawned processes on one machine, or torchrun ranks).

Rank 0 is stage 0 (embedding + layers [0, E) + exit head: the draft loop in decode/ppsd.py).
Rank i >= 1 holds layers stage_layers[i]; the last rank also the final norm + LM head and verifies.

Messages are point-to-point (isend/irecv): a fixed int64 header, then payload tensors whose shape the
header implies. Work (h_E) flows 0 -> 1 -> ... -> S-1; each position's draft goes straight from rank 0 to
the last stage in a DRAFT message sent *after* the work: stage 0 forwards h_E before it runs the exit
head, so the head never sits on the verification path. Verdicts (one per fresh position) flow S-1 -> 0,
where a reader thread queues them (gloo cannot poll a receive) so stage 0 can look for a rejection
between its steps without blocking. Every verify stage reads its incoming links the same way (`Inbox`),
so a receive is always posted before the message is sent.
Every work message carries (epoch, position): an epoch changes on each flush (a rejected draft) and
each new request, so a stage drops stale work instead of waiting for it, and crops its KV cache to
the position of the first message of a newer epoch. Rank 0 waits on every receive with a deadline;
a dead peer closes its sockets (gloo reports it at once), a hung one trips the deadline.

Every tensor a Link sends or receives lives on its `device` (`comm_device()`): this rank's CUDA device
under NCCL (which moves only CUDA tensors), the CPU under gloo. Link.send moves payloads there itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from decode.common import positions, verify, make_generator
from decode import theory
from heads.base import parse_dtype
from heads.hardware import free_port
from heads.errors import UserError

# message kinds
WORK, BEGIN, END, STOP, VERDICT, DONE, STATS, PING, PONG, READY, LAYOUT, DRAFT = range(1, 13)
HAS_Q = 1  # DRAFT flag: the draft distribution q follows (sampling)
NO_DRAFT = -1  # the DRAFT of a position stage 0 already knows is stale (a rejection arrived before its head ran)
MAX_PENDING_SENDS = 64


class PipelineError(RuntimeError):
    """A stage died, hung or broke the protocol: one line, the pipeline is unusable afterwards."""


@dataclass
class Header:
    kind: int
    epoch: int = 0
    pos: int = 0      # first position of a WORK chunk; the verified position of a VERDICT
    n: int = 0        # positions in a WORK chunk
    token: int = 0    # DRAFT: the draft for the token after the chunk; VERDICT: the model's token
    flag: int = 0     # DRAFT: HAS_Q; VERDICT: 1 = draft accepted
    a: int = 0        # BEGIN: seed
    b: int = 0        # BEGIN: temperature (float64 bits)

    def tensor(self, device) -> torch.Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        return cls(*t.tolist())


@dataclass(frozen=True)
class Payloads:
    """The message catalogue: which tensors follow a header of each kind (all a reader needs to take whole
    messages off a link before anyone asks for them)."""

    hidden_size: int
    dtype: torch.dtype
    vocab_size: int

    def shapes(self, h: Header) -> list[tuple[tuple, torch.dtype]]:
        if h.kind == WORK:
            return [((1, h.n, self.hidden_size), self.dtype)]
        if h.kind == DRAFT and h.flag & HAS_Q:
            return [((self.vocab_size,), torch.float32)]
        if h.kind in (DONE, STATS):
            return [((len(STAT_KEYS),), torch.float64)]
        return []


def float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def bits_float(i: int) -> float:
    return float(torch.tensor([i], dtype=torch.int64).view(torch.float64))


# ---- per-stage timing ---------------------------------------------------------------------------

STAT_KEYS = ("positions", "compute_s", "prefill_s", "send_s", "blocked_s", "bubble_s", "wall_s", "cpu_s", "dropped",
             "flushes", "head_s")


@dataclass
class StageStats:
    """One stage's timing over one request (sums; `summary` turns them into per-position figures)."""

    positions: float = 0   # single positions computed (prefill chunks are counted in prefill_s only)
    compute_s: float = 0   # wall time computing those positions
    prefill_s: float = 0
    send_s: float = 0      # time inside sends (posting + waiting for back-pressure)
    blocked_s: float = 0   # time waiting in receives
    bubble_s: float = 0    # of that, waiting for fresh work right after a flush
    wall_s: float = 0      # request start to end as this stage saw it
    cpu_s: float = 0       # thread CPU time while computing: < compute_s means the core was taken away
    dropped: float = 0     # stale positions received and dropped unprocessed
    flushes: float = 0
    head_s: float = 0      # stage 0: of compute_s, the exit head + LM head + draft choice (off the verify path)

    def tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, k) for k in STAT_KEYS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StageStats":
        return cls(*t.tolist())

    def summary(self, layers: range) -> dict:
        n = max(self.positions, 1)
        busy = self.compute_s + self.prefill_s + self.send_s
        return {
            "layers": [layers.start, layers.stop],
            "positions": int(self.positions),
            "compute_s": self.compute_s / n,          # per position
            "head_s": self.head_s / n,                # per position, part of compute_s (stage 0)
            "send_s": self.send_s / n,                # per position (includes the prefill's send)
            "busy_fraction": busy / self.wall_s if self.wall_s else 0.0,
            "blocked_s": self.blocked_s,              # total over the request
            "bubble_s": self.bubble_s,                # total over the request
            "prefill_s": self.prefill_s,
            "dropped": int(self.dropped),
            "flushes": int(self.flushes),
            "contention": max(0.0, 1 - self.cpu_s / self.compute_s) if self.compute_s else 0.0,
        }


# ---- stage layout -------------------------------------------------------------------------------

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
        bounds_ok = (len(pairs) == stages - 1 and pairs[0][0] == exit_layer and pairs[-1][1] == num_layers
                     and all(a < b for a, b in pairs) and all(b == c for (_, b), (c, _) in zip(pairs, pairs[1:])))
        if not bounds_ok:
            raise UserError(f"stage_layers={[list(p) for p in pairs]} must be {stages - 1} contiguous non-empty "
                            f"[start, end) ranges covering [{exit_layer}, {num_layers})")
        return [range(0, exit_layer)] + [range(a, b) for a, b in pairs]
    costs = [1.0] * num_layers if layer_costs is None else list(layer_costs)
    split = theory.balanced_split(costs, num_layers, exit_layer, stages, lm_head_s=lm_head_cost)
    return [range(a, b) for a, b in split]


@torch.inference_mode()
def measure_costs(base, repeats: int = 7) -> tuple[float, float]:
    """(one decoder layer, final norm + LM head) for one position with a short KV cache, seconds (median)."""
    sync = torch.cuda.synchronize if base.device.type == "cuda" else (lambda: None)  # CUDA kernels are async
    layer = base.loaded_layers.start
    r = base.range(layer, layer + 1)
    h = torch.randn(1, 16, base.hidden_size, dtype=base.dtype, device=base.device)
    r.forward(h, positions(0, 16, base.device))
    x = h[:, :1]
    layer_t, head_t = [], []
    for i in range(repeats):
        sync()
        t0 = time.perf_counter()
        r.forward(x, positions(16 + i, 1, base.device))
        sync()
        t1 = time.perf_counter()
        base.logits(x)
        sync()
        t2 = time.perf_counter()
        layer_t.append(t1 - t0), head_t.append(t2 - t1)
    return sorted(layer_t)[repeats // 2], sorted(head_t)[repeats // 2]


# ---- point-to-point messages --------------------------------------------------------------------

def comm_device() -> torch.device:
    """Where this rank's message tensors must live: NCCL sends only CUDA tensors (the device chosen with
    torch.cuda.set_device(LOCAL_RANK) before init_process_group), gloo sends CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Link:
    """One rank's sends (kept alive until complete) and receives (each with a deadline), every tensor on
    `device` (default: comm_device() of the initialised process group)."""

    def __init__(self, rank: int, timeout_s: float, describe=None, device=None):
        self.rank = rank
        self.device = torch.device(device) if device is not None else comm_device()
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending: deque = deque()
        self.send_s = 0.0
        self.describe = describe or (lambda src: f"stage {src}")

    def send(self, dst: int, header: Header | None, *payload: torch.Tensor) -> None:
        """Post a header (None: payload only) and its payload tensors, moved to this link's device."""
        start = time.perf_counter()
        tensors = ([header.tensor(self.device)] if header is not None else []) + \
            [t.to(self.device).contiguous() for t in payload]
        try:
            works = [dist.isend(t, dst) for t in tensors]
            self.pending.append((dst, works, tensors))
            while len(self.pending) > MAX_PENDING_SENDS:
                self._finish_oldest()
        except RuntimeError as e:
            raise self._error(dst, e) from None
        self.send_s += time.perf_counter() - start

    def _finish_oldest(self) -> None:
        dst, works, _ = self.pending.popleft()
        try:
            for w in works:
                w.wait(self.timeout)
        except RuntimeError as e:
            raise self._error(dst, e) from None

    def finish_sends(self) -> None:
        while self.pending:
            self._finish_oldest()

    def recv(self, src: int, shape, dtype, timeout: float | None = None) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            dist.irecv(t, src).wait(self.timeout if timeout is None else datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise self._error(src, e) from None
        return t

    def recv_header(self, src: int, timeout: float | None = None) -> Header:
        return Header.from_tensor(self.recv(src, (len(fields(Header)),), torch.int64, timeout))

    def recv_message(self, src: int, payloads: "Payloads", timeout: float | None = None) -> tuple[Header, list]:
        """A header and the payload tensors its kind implies."""
        h = self.recv_header(src, timeout)
        return h, [self.recv(src, shape, dtype, timeout) for shape, dtype in payloads.shapes(h)]

    def _error(self, peer: int, e: Exception) -> PipelineError:
        text = str(e)
        if "closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
            why = "closed its connection (it crashed or exited)"
        elif "Timed out" in text or "timeout" in text.lower():
            why = f"did not answer within {self.timeout.total_seconds():g} s (hung or dead)"
        else:
            why = f"failed: {text.splitlines()[0][:200]}"
        return PipelineError(f"ppsd pipeline: {self.describe(peer)} {why}")


# ---- the verify-stage worker (ranks 1..S-1) -----------------------------------------------------

def serve(rank: int, world: int, spec: dict) -> None:
    """Load this stage's layers and process messages until STOP (ranks >= 1)."""
    from heads import load_base

    torch.set_num_threads(spec.get("threads", 1))
    layers = range(*spec["layers"])
    last = rank == world - 1
    base = load_base(spec["model_path"], dtype=spec["dtype"], device=spec.get("device", "cpu"), layers=layers,
                     embedding=False, lm_head=last, batch_invariant=spec.get("batch_invariant", False))
    stage = base.range(layers.start, layers.stop)
    link = Link(rank, spec["worker_timeout_s"])
    prev, nxt = rank - 1, rank + 1
    # Readers keep a receive posted on every incoming link, so a message lands while this stage computes:
    # a gloo send whose receive is not yet posted waits for a handshake that, with every core busy, took
    # 1-9 ms per hop (measured on 2 cores). The last stage reads drafts from rank 0 (the same link when S = 2).
    threaded = dist.get_backend() == "gloo"
    payloads = Payloads(base.hidden_size, base.dtype, base.vocab_size)
    work_in = Inbox(link, prev, payloads, threaded)
    drafts_in = None if not last else work_in if prev == 0 else Inbox(link, 0, payloads, threaded)
    link.send(0, Header(READY))
    epoch, temperature, rng = -1, 0.0, None
    stats, begin_t, flushed_at = StageStats(), 0.0, None
    with torch.inference_mode():
        while True:
            t0 = time.perf_counter()
            h, payload = work_in.get()
            if h.kind == STOP:
                link.send(nxt if not last else 0, h)  # the last stage's STOP ends rank 0's verdict reader
                link.finish_sends()
                if drafts_in is not None and drafts_in is not work_in:
                    drafts_in.join()  # rank 0 sends it a STOP too
                return
            if h.kind in (BEGIN, END, PING) and not last:
                link.send(nxt, h)
            if h.kind == BEGIN:
                epoch, temperature = h.epoch, bits_float(h.b)
                rng = make_generator(h.a + 1)
                stage.reset()
                stats, begin_t, flushed_at = StageStats(), time.perf_counter(), None
                link.send_s = 0.0
                continue
            if h.kind == END:
                stats.wall_s = time.perf_counter() - begin_t
                stats.send_s = link.send_s
                link.send(0, Header(DONE if last else STATS, epoch=epoch), stats.tensor())
                continue
            if h.kind == PING:
                if last:
                    link.send(0, Header(PONG))
                continue
            if h.kind != WORK:
                raise PipelineError(f"stage {rank}: unexpected message kind {h.kind}")
            hidden = payload[0]
            arrived = time.perf_counter()
            stats.blocked_s += arrived - t0
            if h.epoch < epoch:  # stale: a flush happened after it was sent (only the last stage knows early)
                stats.dropped += h.n
                if last:
                    next_draft(drafts_in, h)  # every WORK has its DRAFT: keep the stream in step
                continue
            if h.epoch > epoch:  # a newer epoch: what came before it is gone
                if not last:
                    stats.bubble_s += arrived - t0
                epoch = h.epoch
            if flushed_at is not None:
                stats.bubble_s += arrived - flushed_at
                flushed_at = None
            if stage.length > h.pos:
                stage.crop(h.pos)
            if stage.length != h.pos:
                raise PipelineError(f"stage {rank}: got position {h.pos} but holds {stage.length} (protocol bug)")
            c0, cpu0 = time.perf_counter(), time.thread_time()
            out = stage.forward(hidden.to(base.device), positions(h.pos, h.n, base.device))
            if last:
                logits = base.logits(out[:, -1:])[0, -1]
                w0 = time.perf_counter()
                draft, q = next_draft(drafts_in, h)  # sent after h_E: normally here long ago
                waited = time.perf_counter() - w0
                stats.blocked_s += waited
                token, ok = verify(logits, draft, q, temperature, rng)
                c0 += waited
            c1 = time.perf_counter()
            if h.n == 1:
                stats.positions += 1
                stats.compute_s += c1 - c0
                stats.cpu_s += time.thread_time() - cpu0
            else:
                stats.prefill_s += c1 - c0
            if not last:
                link.send(nxt, Header(WORK, h.epoch, h.pos, h.n), out)
                continue
            link.send(0, Header(VERDICT, epoch, h.pos + h.n - 1, 0, token, int(ok)))
            if not ok:  # flush: everything in flight is stale; stage 0 restarts after this position
                epoch += 1
                stats.flushes += 1
                flushed_at = time.perf_counter()


def next_draft(drafts: "Inbox", work: Header) -> tuple[int, torch.Tensor | None]:
    """The last stage's DRAFT for a WORK chunk (straight from rank 0): the draft token and its q, if sampling."""
    d, payload = drafts.get()
    if d.kind != DRAFT or d.epoch != work.epoch or d.pos != work.pos + work.n - 1:
        raise PipelineError(f"stage {drafts.link.rank}: expected the draft of position {work.pos + work.n - 1} epoch "
                            f"{work.epoch}, got kind {d.kind} position {d.pos} epoch {d.epoch} (protocol bug)")
    return d.token, (payload[0] if payload else None)


def _watch_parent(parent_pid: int) -> None:
    """Spawned workers die with their driver: nothing is left orphaned."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(3)


@contextlib.contextmanager
def _sigint_ignored_by_children():
    """Ctrl-C reaches the whole terminal process group; the driver alone handles it (its `finally` stops the
    stages), so stages start with SIGINT ignored (inherited across exec) and print no traceback of their own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _spawned_worker(rank: int, world: int, port: int, spec: dict, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    code = 0
    try:
        timeout = datetime.timedelta(seconds=spec["worker_timeout_s"])
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)
        store.set(f"{STARTED}{rank}", "1")  # rank 0 waits for this, watching that we are alive
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        serve(rank, world, spec)
    except (PipelineError, UserError) as e:
        print(f"error: stage {rank}: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:  # one line, never a traceback wall from a child process
        print(f"error: stage {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr,
              flush=True)
        code = 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    os._exit(code)


STARTED = "ppsd/started/"  # TCPStore key a spawned stage sets once it reaches the rendezvous


def _join_spawned(store, processes: list, timeout_s: float) -> None:
    """Wait until every spawned stage has reached the rendezvous. One that exits first (an import error, no
    memory) is a one-line error at once, not a wait for the process group's hour-long timeout."""
    deadline = time.time() + timeout_s
    waiting = dict(enumerate(processes, 1))
    while waiting:
        for rank, p in list(waiting.items()):
            if store.check([f"{STARTED}{rank}"]):
                del waiting[rank]
            elif not p.is_alive():
                raise PipelineError(f"ppsd pipeline: stage {rank} exited with code {p.exitcode} while starting "
                                    f"(its error is printed above)")
        if waiting and time.time() > deadline:
            raise PipelineError(f"ppsd pipeline: stage(s) {sorted(waiting)} did not start within {timeout_s:g} s")
        time.sleep(0.02)


# ---- rank 0's inbox: everything the last stage sends back ----------------------------------------

class Inbox:
    """Whole messages (header + payloads, `Payloads`) from one source rank, in order.

    gloo cannot poll a receive (is_completed() stays False until wait()), so with `threaded` a daemon
    thread blocks in the receives and queues what arrives: the next receive is always posted, and the
    owner checks for messages between its steps (`poll`) without waiting. The thread ends after a STOP or
    a failed receive. Without it (NCCL: one communicator must not be driven from two threads) `poll` sees
    nothing and `get` receives in the caller's thread.
    """

    def __init__(self, link: Link, src: int, payloads: Payloads, threaded: bool):
        self.link, self.src, self.payloads = link, src, payloads
        self.queue: queue.Queue = queue.Queue()
        self.thread = None
        if threaded:
            self.thread = threading.Thread(target=self._read, name=f"ppsd-inbox-{src}", daemon=True)
            self.thread.start()

    def _read(self) -> None:
        while True:
            try:  # idle between requests is fine: get() has the deadline
                item = self.link.recv_message(self.src, self.payloads, timeout=10 * 24 * 3600.0)
            except Exception as e:  # a dead peer: hand the error to whoever waits next
                self.queue.put(e)
                return
            self.queue.put(item)
            if item[0].kind == STOP:
                return

    def _unpack(self, item):
        if isinstance(item, Exception):
            raise item
        return item

    def get(self, timeout: float | None = None) -> tuple[Header, list]:
        """The next message (header, payloads), waiting at most the link's timeout."""
        if self.thread is None:
            return self.link.recv_message(self.src, self.payloads, timeout)
        wait = self.link.timeout.total_seconds() if timeout is None else timeout
        try:
            return self._unpack(self.queue.get(timeout=wait))
        except queue.Empty:
            alive = "" if self.thread.is_alive() else " (its reader stopped)"
            raise PipelineError(f"ppsd pipeline: {self.link.describe(self.src)} did not answer within {wait:g} s "
                                f"(hung or dead){alive}") from None

    def poll(self) -> list:
        """Every message already here, without waiting (always empty without the reader thread)."""
        items = []
        if self.thread is not None:
            while True:
                try:
                    items.append(self._unpack(self.queue.get_nowait()))
                except queue.Empty:
                    return items
        return items

    def join(self, timeout: float = 2.0) -> bool:
        """Wait for the reader to end (after its STOP); True when no reader is left running."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


# ---- rank 0's handle on the verify stages -------------------------------------------------------

class Pipeline:
    """Stages 1..S-1 as seen from rank 0: start them (spawn, or adopt torchrun ranks), run requests, stop.

    spawn=True starts S-1 processes on this machine (gloo) once and reuses them for every request.
    spawn=False expects torch.distributed to be initialised already with world size S (torchrun):
    the other ranks run `serve_torchrun`.
    """

    adopted_ranks = False  # torchrun: the other ranks got their layout (they stop when this pipeline closes)
    worker = staticmethod(_spawned_worker)  # what each spawned stage process runs

    def __init__(self, model_path: str, dtype: str, layout: list[range], *, spawn: bool = True, stage_threads: int = 1,
                 timeout_s: float = 30.0, worker_timeout_s: float = 3600.0, load_timeout_s: float = 600.0,
                 device: str = "cpu", vocab_size: int, hidden_size: int, batch_invariant: bool = False):
        self.layout, self.stages = layout, len(layout)
        self.last = self.stages - 1
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.processes: list = []
        self.epoch = 0
        self.closed = False
        self.owns_group = spawn
        spec = {"model_path": model_path, "dtype": dtype, "threads": stage_threads, "device": device,
                "worker_timeout_s": worker_timeout_s, "batch_invariant": batch_invariant}
        if spawn:
            import torch.multiprocessing as mp

            if dist.is_initialized():
                raise UserError("ppsd spawns its own stage processes but torch.distributed is already initialised: "
                                "launch with torchrun instead, or from a plain process")
            port = free_port()
            timeout = datetime.timedelta(seconds=max(load_timeout_s, worker_timeout_s))
            store = dist.TCPStore("127.0.0.1", port, self.stages, True, timeout=timeout, wait_for_workers=False)
            ctx = mp.get_context("spawn")
            with _sigint_ignored_by_children():
                for rank in range(1, self.stages):
                    p = ctx.Process(target=self.worker, daemon=True,
                                    args=(rank, self.stages, port, spec | {"layers": (layout[rank].start, layout[rank].stop)},
                                          os.getpid()))
                    p.start()
                    self.processes.append(p)
            try:
                _join_spawned(store, self.processes, load_timeout_s)
            except PipelineError:
                self.kill()
                raise
            dist.init_process_group("gloo", store=store, rank=0, world_size=self.stages, timeout=timeout)
        else:
            if dist.get_world_size() != self.stages:
                raise UserError(f"stages={self.stages} but torchrun started {dist.get_world_size()} processes: "
                                f"use --nproc_per_node {self.stages} (or nnodes × nproc = stages)")
        self.link = Link(0, timeout_s, describe=self._describe)
        if not spawn:
            Pipeline.adopted_ranks = True
            for rank in range(1, self.stages):
                self.link.send(rank, Header(LAYOUT, pos=layout[rank].start, n=layout[rank].stop))
        for rank in range(1, self.stages):  # weights loaded
            self._expect(self.link.recv_header(rank, timeout=load_timeout_s), READY)
        self.inbox = Inbox(self.link, self.last, Payloads(hidden_size, parse_dtype(dtype), vocab_size),
                           threaded=dist.get_backend() == "gloo")
        self.feedback_s = self.measure_feedback()

    @property
    def polls(self) -> bool:
        """Whether stage 0 can look for verdicts without waiting (gloo: a reader thread; NCCL: no)."""
        return self.inbox.thread is not None

    def _describe(self, rank: int) -> str:
        text = f"stage {rank} (layers {self.layout[rank].start}-{self.layout[rank].stop - 1})"
        if self.processes:
            p = self.processes[rank - 1]
            if not p.is_alive():
                p.join(0.1)
                text += f", pid {p.pid}, exit code {p.exitcode},"
        return text

    def check_alive(self) -> None:
        """A spawned stage that has exited while this pipeline is open is an error now, whatever runs meanwhile
        (another method's turn), not when ppsd next talks to it. One waitpid per stage: cheap per token."""
        if self.closed:
            return
        for rank, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                why = self._describe(rank)
                self.kill()
                raise PipelineError(f"ppsd pipeline: {why} exited (it crashed or was killed): every stage is stopped; "
                                    "rerun, and see the stage's own error line above if it printed one")

    def _expect(self, header: Header, kind: int) -> Header:
        if header.kind != kind:
            raise PipelineError(f"ppsd pipeline: expected message kind {kind}, got {header.kind} (protocol bug)")
        return header

    def measure_feedback(self, rounds: int = 5) -> float:
        """One hop's latency: a ping runs 0 -> 1 -> ... -> S-1 -> 0, i.e. S hops (median of `rounds`)."""
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            self.link.send(1, Header(PING))
            self._expect(self.inbox.get()[0], PONG)
            times.append(time.perf_counter() - t0)
        return sorted(times)[rounds // 2] / self.stages

    # one request --------------------------------------------------------------------------------
    def begin(self, temperature: float, seed: int) -> int:
        self.epoch += 1
        self.link.send_s = 0.0
        self.link.send(1, Header(BEGIN, epoch=self.epoch, a=seed, b=float_bits(temperature)))
        return self.epoch

    def send_work(self, epoch: int, pos: int, hidden: torch.Tensor) -> None:
        """h_E of positions [pos, pos + T) down the pipeline; its DRAFT must follow (`send_draft`)."""
        self.link.send(1, Header(WORK, epoch, pos, hidden.shape[1]), hidden)

    def send_draft(self, epoch: int, pos: int, draft: int, q: torch.Tensor | None = None) -> None:
        """The draft of the token after position `pos`, straight to the verifier (NO_DRAFT: known stale)."""
        flag = HAS_Q if q is not None else 0
        self.link.send(self.last, Header(DRAFT, epoch, pos, 0, draft, flag), *([q.float()] if q is not None else []))

    def poll_verdicts(self) -> list[Header]:
        """The verdicts that have arrived, without waiting."""
        return [self._expect(h, VERDICT) for h, _ in self.inbox.poll()]

    def recv_verdict(self) -> Header:
        return self._expect(self.inbox.get()[0], VERDICT)

    def end(self, epoch: int) -> list[StageStats]:
        """Close the request: drop the verdicts still in flight, collect every stage's stats."""
        self.link.send(1, Header(END, epoch=epoch))
        while True:
            h, payload = self.inbox.get()
            if h.kind == DONE:
                last_stats = StageStats.from_tensor(payload[0])
                break
            self._expect(h, VERDICT)
        self.epoch = max(self.epoch, epoch, h.epoch)
        stats = []
        for rank in range(1, self.last):
            self._expect(self.link.recv_header(rank), STATS)
            stats.append(StageStats.from_tensor(self.link.recv(rank, (len(STAT_KEYS),), torch.float64)))
        self.link.finish_sends()
        return stats + [last_stats]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every stage (a STOP message, then join; kill whatever does not exit in time)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.link.send(1, Header(STOP))
            if self.last > 1:  # the last stage's draft reader listens to rank 0 directly
                self.link.send(self.last, Header(STOP))
            self.link.finish_sends()
            while self.inbox.get(timeout)[0].kind != STOP:  # the last stage's STOP: every stage has stopped
                pass
        except Exception:
            pass
        deadline = time.time() + timeout
        for p in self.processes:
            p.join(max(0.1, deadline - time.time()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(1)
        self._leave_group()

    def _leave_group(self) -> None:
        """Destroy the process group this handle created (a torchrun group belongs to the launcher)."""
        inbox = getattr(self, "inbox", None)
        if inbox is not None and not inbox.join(2):  # it ends on the last stage's STOP, or when its peer is gone
            return  # never tear the group down under a thread still inside it; the process exits soon
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer can make teardown fail; nothing is left to save
                pass

    def kill(self) -> None:
        """After an error: no messages, just make sure no stage outlives us."""
        self.closed = True
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(2)
        self._leave_group()


def release_torchrun_ranks(timeout_s: float = 10.0) -> None:
    """Rank 0 under torchrun, at exit: if no pipeline ever took the other ranks (no ppsd method, or an
    error before it started), tell them to stop instead of leaving them waiting for a layout."""
    if Pipeline.adopted_ranks or not dist.is_initialized() or dist.get_rank() != 0:
        return
    link = Link(0, timeout_s)
    for rank in range(1, dist.get_world_size()):
        link.send(rank, Header(STOP))
    link.finish_sends()


def serve_torchrun(spec: dict) -> None:
    """Ranks >= 1 under torchrun: receive the layout from rank 0, then serve until STOP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    link = Link(rank, spec["worker_timeout_s"])
    h = link.recv_header(0, timeout=spec.get("load_timeout_s", 3600))
    if h.kind == STOP:
        return
    if h.kind != LAYOUT:
        raise PipelineError(f"stage {rank}: expected the layout, got message kind {h.kind}")
    serve(rank, world, spec | {"layers": (h.pos, h.n)})
