"""Rank 0's handle on the verify stages of the PPSD pipeline: start them (spawned processes on one machine,
or torchrun ranks), run requests through them, stop them.

Rank 0 is stage 0 (embedding + layers [0, E) + exit head: the draft loop in decode/ppsd.py). Rank i >= 1
holds layers layout[i] (decode/layout.py) and runs decode/stage.py; the last rank also the final norm +
LM head, and verifies. They talk in decode/protocol.py's messages.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from decode.protocol import (BEGIN, DONE, DRAFT, END, LAYOUT, PING, PONG, READY, STAT_KEYS, STATS, STOP, VERDICT, WORK,
                             Header, Inbox, Link, Payloads, PipelineError, StageStats)
from decode.spec import RunSpec
from decode.stage import serve
from heads.base import parse_dtype
from heads.errors import UserError
from heads.hardware import median_seconds


# ---- spawned stage processes --------------------------------------------------------------------

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


def _spawned_worker(rank: int, world: int, port: int, spec: RunSpec, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    code = 0
    try:
        timeout = datetime.timedelta(seconds=spec.worker_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)
        store.set(f"{STARTED}{rank}", "1")  # rank 0 waits for this, watching that we are alive
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        serve(rank, world, spec, torch.device(spec.device))
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


# ---- rank 0's handle on the verify stages -------------------------------------------------------

class Pipeline:
    """Stages 1..S-1 as seen from rank 0: start them (spawn, or adopt torchrun ranks), run requests, stop.

    spawn=True starts S-1 processes on this machine (gloo) once and reuses them for every request.
    spawn=False expects torch.distributed to be initialised already with world size S (torchrun):
    the other ranks run `decode.stage.serve_torchrun`.
    """

    adopted_ranks = False  # torchrun: the other ranks got their layout (they stop when this pipeline closes)
    worker = staticmethod(_spawned_worker)  # what each spawned stage process runs

    def __init__(self, spec: RunSpec, *, hidden_size: int, vocab_size: int, spawn: bool = True):
        """The stages of `spec.layout` on `spec`'s settings; hidden_size and vocab_size: the base's (the messages'
        shapes)."""
        self.spec, self.layout, self.stages = spec, [spec.layers(i) for i in range(spec.stages)], spec.stages
        self.last = self.stages - 1
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.processes: list = []
        self.epoch = 0
        self.closed = False
        self.owns_group = spawn
        if spawn:
            self._spawn()
        elif dist.get_world_size() != self.stages:
            raise UserError(f"stages={self.stages} but torchrun started {dist.get_world_size()} processes: "
                            f"use --nproc_per_node {self.stages} (or nnodes × nproc = stages)")
        self.link = Link(0, spec.timeout_s, describe=self._describe)
        if not spawn:  # the other ranks compute with this spec, unchanged
            Pipeline.adopted_ranks = True
            data = torch.frombuffer(bytearray(spec.to_json()), dtype=torch.uint8)
            for rank in range(1, self.stages):
                self.link.send(rank, Header(LAYOUT, n=len(data)), data)
        for rank in range(1, self.stages):  # weights loaded
            self._expect(self.link.recv_header(rank, timeout=spec.load_timeout_s), READY)
        self.inbox = Inbox(self.link, self.last, Payloads(hidden_size, parse_dtype(spec.dtype), vocab_size),
                           threaded=dist.get_backend() == "gloo")
        self.feedback_s = self.measure_feedback()

    def _spawn(self) -> None:
        """Start stages 1..S-1 as processes of this machine, each given the spec, and join them in a gloo group."""
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise UserError("ppsd spawns its own stage processes but torch.distributed is already initialised: "
                            "launch with torchrun instead, or from a plain process")
        timeout = datetime.timedelta(seconds=max(self.spec.load_timeout_s, self.spec.worker_timeout_s))
        # port 0: the store binds a free port itself (a port picked first could be taken before the bind)
        store = dist.TCPStore("127.0.0.1", 0, self.stages, True, timeout=timeout, wait_for_workers=False)
        port = store.port
        ctx = mp.get_context("spawn")
        with _sigint_ignored_by_children():
            for rank in range(1, self.stages):
                p = ctx.Process(target=self.worker, daemon=True, args=(rank, self.stages, port, self.spec, os.getpid()))
                p.start()
                self.processes.append(p)
        try:
            _join_spawned(store, self.processes, self.spec.load_timeout_s)
        except PipelineError:
            self.kill()
            raise
        dist.init_process_group("gloo", store=store, rank=0, world_size=self.stages, timeout=timeout)

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
        def ping() -> None:
            self.link.send(1, Header(PING))
            self._expect(self.inbox.get()[0], PONG)

        return median_seconds(ping, rounds) / self.stages

    # one request --------------------------------------------------------------------------------
    def begin(self, sampling, seed: int) -> int:
        self.epoch += 1
        self.link.send_s = 0.0
        self.link.send(1, Header(BEGIN, epoch=self.epoch, seed=seed, temperature=sampling.temperature,
                                 top_p=sampling.top_p, top_k=sampling.top_k))
        return self.epoch

    def send_work(self, epoch: int, pos: int, hidden: torch.Tensor) -> None:
        """h_E of positions [pos, pos + T) down the pipeline; its DRAFT must follow (`send_draft`)."""
        self.link.send(1, Header(WORK, epoch, pos, hidden.shape[1]), hidden)

    def send_draft(self, epoch: int, pos: int, draft: int, q: torch.Tensor | None = None) -> None:
        """The draft of the token after position `pos`, straight to the verifier (NO_DRAFT: known stale)."""
        header = Header(DRAFT, epoch, pos, token=draft, has_q=q is not None)
        self.link.send(self.last, header, *([q.float()] if q is not None else []))

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

