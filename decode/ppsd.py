"""Pipeline-parallel self-speculative decoding, stage 0's loop (the driver, rank 0).

Stage 0 runs embedding + layers [0, E) + exit head + LM head. For position p it runs layers [0, E),
sends h_E(p) down the pipeline at once, then runs the head and sends the draft d_{p+1} straight to the
last stage (which needs it only after its own layers), and immediately starts position p+1 with d_{p+1}
as input: it drafts from its own drafts while the later stages verify, and the head stays off the
path of a rejected position. The last stage sends one verdict per fresh position (the model's token
y_{p+1}, accepted or not); stage 0 looks for verdicts between its steps (after the layers: a
rejection there saves the head) and waits for one when `window` positions are in flight. Each
verdict's token is emitted at once. On a rejection the epoch moves on, stage 0 crops its cache to p+1
and restarts from y_{p+1}; the later stages drop or overwrite the stale positions (decode/stage.py).

Greedy: accept iff d == y, so the output is AR's token for token. Sampling: stage 0 samples d from
its q and sends q; the last stage applies the one-draft speculative rule (decode.common.verify), so
each emitted token is distributed exactly as the model's p given the verified prefix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import torch

from decode.common import GREEDY, Generation, Sampling, choose, head_logits, lower_step, make_generator
from decode.protocol import NO_DRAFT, StageStats


def default_window(pipeline) -> int:
    """Positions in flight: S keeps every stage busy. One more would hide the verdict's trip back at high
    acceptance, but measured on SmolLM2 (2 cores, oracle drafts) it cost 19 % at α = 0 (84 vs 71 ms per
    token: a verdict landing just after stage 0 looked makes it finish one more speculative position)."""
    return pipeline.stages


@torch.inference_mode()
def ppsd_decode(base, head, pipeline, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY,
                seed: int = 0, stop_ids: set[int] = frozenset(), oracle=None, window: int | None = None) -> Iterator[int]:
    """Yield tokens as they are verified; return a Generation whose stats hold one dict per stage."""
    start = time.perf_counter()
    window = window or default_window(pipeline)
    lower = base.range(0, head.exit_layer)
    rng = make_generator(seed)
    n_prompt = len(prompt_ids)
    last_useful = n_prompt + max_new_tokens - 2  # position p yields generated token p + 1 - n_prompt
    me = StageStats()
    epoch = pipeline.begin(sampling, seed)

    def draft(hidden, pos_ids) -> tuple[int, torch.Tensor | None]:
        d, q = choose(head_logits(base, head, lower, hidden, pos_ids), sampling, rng)
        if oracle is not None:
            d = oracle.draft(int(pos_ids[0, -1]) + 1 - n_prompt, d)
        return d, q

    t0 = time.perf_counter()
    hidden, pos_ids = lower_step(base, lower, torch.tensor([prompt_ids], device=base.device), 0)
    pipeline.send_work(epoch, 0, hidden)
    x, q = draft(hidden, pos_ids)
    pipeline.send_draft(epoch, n_prompt - 1, x, q)
    me.prefill_s = time.perf_counter() - t0
    in_flight = deque([n_prompt - 1])  # positions whose verdict is due
    next_pos = n_prompt
    tokens, accept_lengths, run = [], [], 0
    verified = accepted = 0
    done = False
    try:
        while not done:
            verdicts = []
            if len(in_flight) < window and next_pos <= last_useful and x not in stop_ids:
                c0, cpu0 = time.perf_counter(), time.thread_time()
                hidden, pos_ids = lower_step(base, lower, torch.tensor([[x]], device=base.device), next_pos)
                s0 = time.perf_counter()
                pipeline.send_work(epoch, next_pos, hidden)
                verdicts = pipeline.poll_verdicts()  # a rejection already here makes this position stale
                h0 = time.perf_counter()
                if all(v.accepted for v in verdicts):
                    x, q = draft(hidden, pos_ids)
                else:  # the verifier drops this position: answer its DRAFT without running the head
                    x, q = NO_DRAFT, None
                h1 = time.perf_counter()
                pipeline.send_draft(epoch, next_pos, x, q)
                me.compute_s += (s0 - c0) + (h1 - h0)
                me.head_s += h1 - h0
                me.cpu_s += time.thread_time() - cpu0
                me.positions += 1
                in_flight.append(next_pos)
                next_pos += 1
            if not verdicts:
                verdicts = pipeline.poll_verdicts()
            if not verdicts and (len(in_flight) >= window or next_pos > last_useful or x in stop_ids):
                if not in_flight:
                    raise RuntimeError("ppsd: nothing in flight and nothing to draft (decoder bug)")
                w0 = time.perf_counter()
                verdicts = [pipeline.recv_verdict()]
                me.blocked_s += time.perf_counter() - w0
            for verdict in verdicts:
                pos = in_flight.popleft()
                if verdict.pos != pos or verdict.epoch != epoch:
                    raise RuntimeError(f"ppsd: verdict for position {verdict.pos} epoch {verdict.epoch}, "
                                       f"expected {pos} epoch {epoch} (decoder bug)")
                tokens.append(verdict.token)
                verified += 1
                accepted += verdict.accepted
                run += 1
                yield verdict.token
                if verdict.token in stop_ids or len(tokens) >= max_new_tokens:
                    done = True
                    break
                if not verdict.accepted:  # flush: restart after `pos` from the model's token
                    accept_lengths.append(run)
                    run = 0
                    epoch += 1
                    me.flushes += 1
                    lower.crop(pos + 1)
                    in_flight.clear()
                    next_pos, x = pos + 1, verdict.token
                    break  # the last stage sends nothing more for the old epoch
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
                             "feedback_s": pipeline.feedback_s, "prefill_s": me.prefill_s,
                             "polls": pipeline.polls})
