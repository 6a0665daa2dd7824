"""The PPSD pipeline's messages over torch.distributed: kinds, headers, payloads, links and inboxes.

Messages are point-to-point (isend/irecv): a fixed-size int64 header (`Header`), then payload tensors
whose shape the header implies (`Payloads`). Work (h_E) flows 0 -> 1 -> ... -> S-1; each position's
draft goes straight from rank 0 to the last stage in a DRAFT message sent *after* the work: stage 0
forwards h_E before it runs the exit head, so the head never sits on the verification path. Verdicts
(one per fresh position) flow S-1 -> 0, where a reader thread queues them (gloo cannot poll a receive)
so stage 0 can look for a rejection between its steps without blocking. Every verify stage reads its
incoming links the same way (`Inbox`), so a receive is always posted before the message is sent.
Every work message carries (epoch, position): an epoch changes on each flush (a rejected draft) and
each new request, so a stage drops stale work instead of waiting for it, and crops its KV cache to
the position of the first message of a newer epoch. Rank 0 waits on every receive with a deadline;
a dead peer closes its sockets (gloo reports it at once), a hung one trips the deadline.

Every tensor a Link sends or receives lives on its `device` (`comm_device()`): this rank's CUDA device
under NCCL (which moves only CUDA tensors), the CPU under gloo. Link.send moves payloads there itself.
"""

from __future__ import annotations

import datetime
import queue
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

# message kinds
WORK, BEGIN, END, STOP, VERDICT, DONE, STATS, PING, PONG, READY, LAYOUT, DRAFT = range(1, 13)
NO_DRAFT = -1  # the DRAFT of a position stage 0 already knows is stale (a rejection arrived before its head ran)
MAX_PENDING_SENDS = 64


class PipelineError(RuntimeError):
    """A stage died, hung or broke the protocol: one line, the pipeline is unusable afterwards."""


@dataclass
class Header:
    """A message's kind and the fields of that kind (the others stay at their defaults). On the wire: one
    int64 per field, in this order (the float fields as their float64 bits)."""

    kind: int
    epoch: int = 0            # WORK, DRAFT, VERDICT, BEGIN, END, DONE, STATS: the request and flush it belongs to
    pos: int = 0              # WORK: first position of the chunk; DRAFT, VERDICT: the position whose next token it is
    n: int = 0                # WORK: positions in the chunk; LAYOUT: bytes of the run's spec (JSON) that follow
    token: int = 0            # DRAFT: the draft for the token after `pos`; VERDICT: the model's token
    has_q: bool = False       # DRAFT: the draft distribution q follows (sampling)
    accepted: bool = False    # VERDICT: the draft was accepted
    seed: int = 0             # BEGIN: the request's sampling seed
    temperature: float = 0.0  # BEGIN: the request's sampling (heads.sampling.Sampling)
    top_p: float = 1.0
    top_k: int = 0

    def tensor(self, device) -> torch.Tensor:
        wire = [_float_bits(getattr(self, f.name)) if f.name in FLOAT_FIELDS else int(getattr(self, f.name))
                for f in fields(self)]
        return torch.tensor(wire, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        values = dict(zip((f.name for f in fields(cls)), t.tolist()))
        return cls(**(values | {"has_q": bool(values["has_q"]), "accepted": bool(values["accepted"])}
                      | {name: _bits_float(values[name]) for name in FLOAT_FIELDS}))


FLOAT_FIELDS = ("temperature", "top_p")


def _float_bits(x: float) -> int:
    return struct.unpack("=q", struct.pack("=d", float(x)))[0]


def _bits_float(i: int) -> float:
    return struct.unpack("=d", struct.pack("=q", i))[0]


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
        if h.kind == DRAFT and h.has_q:
            return [((self.vocab_size,), torch.float32)]
        if h.kind in (DONE, STATS):
            return [((len(STAT_KEYS),), torch.float64)]
        if h.kind == LAYOUT:
            return [((h.n,), torch.uint8)]
        return []


# ---- per-stage timing (the payload of DONE and STATS) -------------------------------------------

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

    @classmethod
    def from_clock(cls, clock, positions: int, **counts) -> "StageStats":
        """A request's stats from its decode.clock.Clock: the phases compute (its thread CPU time too), head,
        prefill, blocked and bubble, the time since the clock started, and `counts` (send_s, dropped, flushes)."""
        return cls(positions=positions, compute_s=clock.wall["compute"], prefill_s=clock.wall["prefill"],
                   blocked_s=clock.wall["blocked"], bubble_s=clock.wall["bubble"], wall_s=clock.elapsed(),
                   cpu_s=clock.cpu["compute"], head_s=clock.wall["head"], **counts)

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


# ---- point-to-point links -----------------------------------------------------------------------

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


# ---- whole messages from one source rank, read ahead --------------------------------------------

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

