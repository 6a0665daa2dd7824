"""A verify stage of the PPSD pipeline (ranks 1..S-1): load its layers, then process messages until STOP.

Rank i >= 1 holds layers `spec.layers(i)` of the run's RunSpec (decode/spec.py); the last rank also the final
norm + LM head, and verifies each position's draft (a DRAFT straight from rank 0) against the model's token,
sending a VERDICT back. Rank 0 (stage 0: embedding + layers [0, E) + exit head) is the draft loop in
decode/ppsd.py; it starts the stages and talks to them through decode/pipeline.py. The messages are
decode/protocol.py's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from decode.clock import Clock
from decode.common import GREEDY, Sampling, make_generator, positions, verify
from decode.protocol import (BEGIN, DONE, DRAFT, END, LAYOUT, PING, PONG, READY, STATS, STOP, VERDICT, WORK, Header,
                             Inbox, Link, Payloads, PipelineError, StageStats)
from decode.spec import RunSpec


class VerifyStage:
    """One verify stage serving requests: its layers, its links, and the current request's state and timing."""

    def __init__(self, rank: int, world: int, spec: RunSpec, device: torch.device):
        from heads import load_base

        torch.set_num_threads(spec.stage_threads)
        self.rank, self.last, self.next = rank, rank == world - 1, rank + 1
        layers = spec.layers(rank)
        self.base = load_base(spec.model_path, dtype=spec.dtype, device=device, layers=layers, embedding=False,
                              lm_head=self.last, batch_invariant=spec.batch_invariant)
        self.base.set_runtime(spec.runtime)
        self.layers = self.base.range(layers.start, layers.stop)
        self.link = Link(rank, spec.worker_timeout_s)
        # Readers keep a receive posted on every incoming link, so a message lands while this stage computes:
        # a gloo send whose receive is not yet posted waits for a handshake that, with every core busy, took
        # 1-9 ms per hop (measured on 2 cores). The last stage reads drafts from rank 0 (the same link when S = 2).
        threaded = dist.get_backend() == "gloo"
        payloads = Payloads(self.base.hidden_size, self.base.dtype, self.base.vocab_size)
        self.work_in = Inbox(self.link, rank - 1, payloads, threaded)
        self.drafts_in = None
        if self.last:
            self.drafts_in = self.work_in if rank == 1 else Inbox(self.link, 0, payloads, threaded)
        self.epoch, self.sampling, self.rng = -1, GREEDY, None
        self.clock, self.flushed_at, self.dropped, self.flushes = Clock(), None, 0, 0

    @torch.inference_mode()
    def serve(self) -> None:
        """Process messages until STOP."""
        self.link.send(0, Header(READY))
        while True:
            with self.clock.phase() as wait:
                h, payload = self.work_in.get()
            if h.kind == STOP:
                return self.stop(h)
            if h.kind in (BEGIN, END, PING) and not self.last:
                self.link.send(self.next, h)
            if h.kind == BEGIN:
                self.begin(h)
            elif h.kind == END:
                self.end()
            elif h.kind == PING:
                if self.last:
                    self.link.send(0, Header(PONG))
            elif h.kind == WORK:
                self.work(h, payload[0], wait.s)
            else:
                raise PipelineError(f"stage {self.rank}: unexpected message kind {h.kind}")

    def begin(self, h: Header) -> None:
        self.epoch, self.sampling = h.epoch, Sampling(h.temperature, h.top_p, h.top_k)
        self.rng = make_generator(h.seed + 1)
        self.layers.reset()
        self.clock, self.flushed_at, self.dropped, self.flushes = Clock(), None, 0, 0
        self.link.send_s = 0.0

    def end(self) -> None:
        """The request's stats to rank 0 (the last stage's DONE ends the request there)."""
        stats = StageStats.from_clock(self.clock, self.clock.count["compute"], send_s=self.link.send_s,
                                      dropped=self.dropped, flushes=self.flushes)
        self.link.send(0, Header(DONE if self.last else STATS, epoch=self.epoch), stats.tensor())

    def stop(self, h: Header) -> None:
        self.link.send(self.next if not self.last else 0, h)  # the last stage's STOP ends rank 0's verdict reader
        self.link.finish_sends()
        if self.drafts_in is not None and self.drafts_in is not self.work_in:
            self.drafts_in.join()  # rank 0 sends it a STOP too

    def work(self, h: Header, hidden: torch.Tensor, waited: float) -> None:
        """h_E of positions [h.pos, h.pos + h.n) through this stage's layers: on to the next stage, or verified."""
        clock = self.clock
        clock.add("blocked", waited)
        if h.epoch < self.epoch:  # stale: a flush happened after it was sent (only the last stage knows early)
            self.dropped += h.n
            if self.last:
                next_draft(self.drafts_in, h)  # every WORK has its DRAFT: keep the stream in step
            return
        if h.epoch > self.epoch:  # a newer epoch: what came before it is gone
            if not self.last:
                clock.add("bubble", waited)
            self.epoch = h.epoch
        if self.flushed_at is not None:  # the last stage, idle since its flush
            clock.add("bubble", clock.elapsed() - self.flushed_at)
            self.flushed_at = None
        if self.layers.length > h.pos:
            self.layers.crop(h.pos)
        if self.layers.length != h.pos:
            raise PipelineError(f"stage {self.rank}: got position {h.pos} but holds {self.layers.length} "
                                "(protocol bug)")
        phase = "compute" if h.n == 1 else "prefill"
        with clock.phase(phase):
            out = self.layers.forward(hidden.to(self.base.device), positions(h.pos, h.n, self.base.device))
            if self.last:
                logits = self.base.logits(out[:, -1:])[0, -1]
        if not self.last:
            self.link.send(self.next, Header(WORK, h.epoch, h.pos, h.n), out)
            return
        with clock.phase("blocked"):
            draft, q = next_draft(self.drafts_in, h)  # sent after h_E: normally here long ago
        with clock.phase(phase):
            token, ok = verify(logits, draft, q, self.sampling, self.rng)
        clock.count[phase] -= 1  # one position, timed in two parts
        self.link.send(0, Header(VERDICT, self.epoch, h.pos + h.n - 1, token=token, accepted=ok))
        if not ok:  # flush: everything in flight is stale; stage 0 restarts after this position
            self.epoch += 1
            self.flushes += 1
            self.flushed_at = clock.elapsed()


def serve(rank: int, world: int, spec: RunSpec, device: torch.device) -> None:
    """Load this stage's layers (spec.layers(rank)) on `device` and process messages until STOP (ranks >= 1)."""
    VerifyStage(rank, world, spec, device).serve()


def next_draft(drafts: Inbox, work: Header) -> tuple[int, torch.Tensor | None]:
    """The last stage's DRAFT for a WORK chunk (straight from rank 0): the draft token and its q, if sampling."""
    d, payload = drafts.get()
    if d.kind != DRAFT or d.epoch != work.epoch or d.pos != work.pos + work.n - 1:
        raise PipelineError(f"stage {drafts.link.rank}: expected the draft of position {work.pos + work.n - 1} epoch "
                            f"{work.epoch}, got kind {d.kind} position {d.pos} epoch {d.epoch} (protocol bug)")
    return d.token, (payload[0] if payload else None)


def serve_torchrun(timeout_s: float = 3600.0) -> None:
    """Ranks >= 1 under torchrun: receive rank 0's RunSpec (with the LAYOUT message), then serve until STOP. On
    CUDA this rank computes on its own GPU (the current device, cuda:LOCAL_RANK), else where the spec says."""
    rank, world = dist.get_rank(), dist.get_world_size()
    link = Link(rank, timeout_s)
    h, payload = link.recv_message(0, Payloads(0, torch.float32, 0), timeout=timeout_s)
    if h.kind == STOP:
        return
    if h.kind != LAYOUT:
        raise PipelineError(f"stage {rank}: expected the layout, got message kind {h.kind}")
    spec = RunSpec.from_json(payload[0].cpu().numpy().tobytes())
    device = torch.device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    serve(rank, world, spec, device)
