"""Pipeline-parallel self-speculative decoding, stage 0's loop (the driver, rank 0).

Stage 0 runs embedding + layers [0, E) + exit head + LM head. For position p it computes the draft
d_{p+1}, sends (p, d_{p+1}, h_E(p)) down the pipeline and immediately starts position p+1 with
d_{p+1} as input: it drafts from its own drafts while the later stages verify. The last stage sends
one verdict per fresh position (the model's token y_{p+1}, accepted or not); stage 0 reads verdicts
in order whenever its in-flight window is full (gloo cannot poll a receive, so the window sets
the rhythm: S positions in flight keep every stage busy). Each verdict's token is emitted at once.
On a rejection the epoch moves on, stage 0 crops its cache to p+1 and restarts from y_{p+1}; the
later stages drop or overwrite the stale positions (decode/pipeline.py).

Greedy: accept iff d == y, so the output is AR's token for token. Sampling: stage 0 samples d from
its q and sends q; the last stage applies the one-draft speculative rule (decode.common.verify), so
each emitted token is distributed exactly as the model's p given the verified prefix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import torch

from decode.common import Generation, choose, draft_step, make_generator
from decode.pipeline import StageStats


@torch.inference_mode()
def ppsd_decode(base, head, pipeline, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                seed: int = 0, stop_ids: set[int] = frozenset(), oracle=None, window: int | None = None) -> Iterator[int]:
    """Yield tokens as they are verified; return a Generation whose stats hold one dict per stage."""
    start = time.perf_counter()
    window = window or pipeline.stages
    lower = base.range(0, head.exit_layer)
    rng = make_generator(seed)
    n_prompt = len(prompt_ids)
    last_useful = n_prompt + max_new_tokens - 2  # position p yields generated token p + 1 - n_prompt
    me = StageStats()
    epoch = pipeline.begin(temperature, seed)

    def draft(token_ids: torch.Tensor, pos: int):
        hidden, logits = draft_step(base, head, lower, token_ids, pos)
        d, q = choose(logits, temperature, rng)
        if oracle is not None:
            d = oracle.draft(pos + token_ids.shape[1] - n_prompt, d)
        return hidden, d, q

    t0 = time.perf_counter()
    hidden, x, q = draft(torch.tensor([prompt_ids], device=base.device), 0)
    me.prefill_s = time.perf_counter() - t0
    pipeline.send_work(epoch, 0, hidden, x, q)
    in_flight = deque([(n_prompt - 1, x)])  # (position, the draft it sent) awaiting a verdict
    next_pos = n_prompt
    tokens, accept_lengths, run = [], [], 0
    verified = accepted = 0
    try:
        while True:
            if len(in_flight) < window and next_pos <= last_useful and x not in stop_ids:
                c0, cpu0 = time.perf_counter(), time.thread_time()
                hidden, x, q = draft(torch.tensor([[x]], device=base.device), next_pos)
                me.compute_s += time.perf_counter() - c0
                me.cpu_s += time.thread_time() - cpu0
                me.positions += 1
                pipeline.send_work(epoch, next_pos, hidden, x, q)
                in_flight.append((next_pos, x))
                next_pos += 1
                continue
            if not in_flight:
                raise RuntimeError("ppsd: nothing in flight and nothing to draft (decoder bug)")
            w0 = time.perf_counter()
            verdict = pipeline.recv_verdict()
            me.blocked_s += time.perf_counter() - w0
            pos, _ = in_flight.popleft()
            if verdict.pos != pos or verdict.epoch != epoch:
                raise RuntimeError(f"ppsd: verdict for position {verdict.pos} epoch {verdict.epoch}, "
                                   f"expected {pos} epoch {epoch} (decoder bug)")
            tokens.append(verdict.token)
            verified += 1
            accepted += verdict.flag
            run += 1
            yield verdict.token
            if verdict.token in stop_ids or len(tokens) >= max_new_tokens:
                break
            if not verdict.flag:  # flush: restart after `pos` from the model's token
                accept_lengths.append(run)
                run = 0
                epoch += 1
                me.flushes += 1
                lower.crop(pos + 1)
                in_flight.clear()
                next_pos, x = pos + 1, verdict.token
    except GeneratorExit:  # the consumer stopped early: close the request so the stages are reusable
        pipeline.end(epoch)
        raise
    if run:
        accept_lengths.append(run)
    me.send_s = pipeline.link.send_s
    stage_stats = pipeline.end(epoch)
    me.wall_s = time.perf_counter() - start
    per_stage = [s.summary(r) for s, r in zip([me] + stage_stats, pipeline.layout)]
    return Generation(tokens=tokens, method="ppsd", wall_time=me.wall_s, prompt_tokens=n_prompt,
                      drafts_verified=verified, drafts_accepted=accepted, accept_lengths=accept_lengths,
                      stats={"stages": per_stage, "window": window, "flushes": int(me.flushes),
                             "feedback_s": pipeline.feedback_s, "prefill_s": me.prefill_s})
