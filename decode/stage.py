"""A verify stage of the PPSD pipeline (ranks 1..S-1): load its layers, then process messages until STOP.

Rank i >= 1 holds layers `StageSpec.layers`; the last rank also the final norm + LM head, and verifies
each position's draft (a DRAFT straight from rank 0) against the model's token, sending a VERDICT back.
Rank 0 (stage 0: embedding + layers [0, E) + exit head) is the draft loop in decode/ppsd.py; it starts the
stages and talks to them through decode/pipeline.py. The messages are decode/protocol.py's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from decode.common import GREEDY, Sampling, make_generator, positions, verify
from decode.protocol import (BEGIN, DONE, DRAFT, END, LAYOUT, PING, PONG, READY, STATS, STOP, VERDICT, WORK, Header,
                             Inbox, Link, Payloads, PipelineError, StageStats)


@dataclass(frozen=True)
class StageSpec:
    """What a verify stage needs to start (picklable: it crosses into spawned processes)."""

    model_path: str
    dtype: str
    device: str = "cpu"
    threads: int = 1
    worker_timeout_s: float = 3600.0   # the deadline on every message once it serves
    batch_invariant: bool = False
    compile: bool = False              # static caches and compiled steps (heads/runtime.py)
    rows: int = 0                      # batch-invariant compiled steps: their fixed position count (as rank 0's)
    load_timeout_s: float = 3600.0     # torchrun: how long to wait for rank 0's layout
    layers: range | None = None        # its decoder layers (torchrun: from rank 0's LAYOUT message)


def serve(rank: int, world: int, spec: StageSpec) -> None:
    """Load this stage's layers and process messages until STOP (ranks >= 1)."""
    from heads import load_base

    torch.set_num_threads(spec.threads)
    layers = spec.layers
    last = rank == world - 1
    base = load_base(spec.model_path, dtype=spec.dtype, device=spec.device, layers=layers,
                     embedding=False, lm_head=last, batch_invariant=spec.batch_invariant)
    if spec.compile:
        base.set_runtime(compile=True, rows=spec.rows)
    stage = base.range(layers.start, layers.stop)
    link = Link(rank, spec.worker_timeout_s)
    prev, nxt = rank - 1, rank + 1
    # Readers keep a receive posted on every incoming link, so a message lands while this stage computes:
    # a gloo send whose receive is not yet posted waits for a handshake that, with every core busy, took
    # 1-9 ms per hop (measured on 2 cores). The last stage reads drafts from rank 0 (the same link when S = 2).
    threaded = dist.get_backend() == "gloo"
    payloads = Payloads(base.hidden_size, base.dtype, base.vocab_size)
    work_in = Inbox(link, prev, payloads, threaded)
    drafts_in = None if not last else work_in if prev == 0 else Inbox(link, 0, payloads, threaded)
    link.send(0, Header(READY))
    epoch, sampling, rng = -1, GREEDY, None
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
                epoch, sampling = h.epoch, Sampling(h.temperature, h.top_p, h.top_k)
                rng = make_generator(h.seed + 1)
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
                token, ok = verify(logits, draft, q, sampling, rng)
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
            link.send(0, Header(VERDICT, epoch, h.pos + h.n - 1, token=token, accepted=ok))
            if not ok:  # flush: everything in flight is stale; stage 0 restarts after this position
                epoch += 1
                stats.flushes += 1
                flushed_at = time.perf_counter()


def next_draft(drafts: Inbox, work: Header) -> tuple[int, torch.Tensor | None]:
    """The last stage's DRAFT for a WORK chunk (straight from rank 0): the draft token and its q, if sampling."""
    d, payload = drafts.get()
    if d.kind != DRAFT or d.epoch != work.epoch or d.pos != work.pos + work.n - 1:
        raise PipelineError(f"stage {drafts.link.rank}: expected the draft of position {work.pos + work.n - 1} epoch "
                            f"{work.epoch}, got kind {d.kind} position {d.pos} epoch {d.epoch} (protocol bug)")
    return d.token, (payload[0] if payload else None)


def serve_torchrun(spec: StageSpec) -> None:
    """Ranks >= 1 under torchrun: receive the layout from rank 0, then serve until STOP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    link = Link(rank, spec.worker_timeout_s)
    h = link.recv_header(0, timeout=spec.load_timeout_s)
    if h.kind == STOP:
        return
    if h.kind != LAYOUT:
        raise PipelineError(f"stage {rank}: expected the layout, got message kind {h.kind}")
    serve(rank, world, replace(spec, layers=range(h.layer_start, h.layer_stop)))
