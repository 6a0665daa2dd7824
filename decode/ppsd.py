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

from collections import deque
from collections.abc import Generator

import torch

from decode.clock import Clock
from decode.common import GREEDY, Generation, Sampling, choose, head_logits, lower_step, make_generator
from decode.protocol import NO_DRAFT, StageStats


def default_window(pipeline) -> int:
    """Positions in flight: S keeps every stage busy. One more would hide the verdict's trip back at high
    acceptance, but measured on SmolLM2 (2 cores, oracle drafts) it cost 19 % at α = 0 (84 vs 71 ms per
    token: a verdict landing just after stage 0 looked makes it finish one more speculative position)."""
    return pipeline.stages


@torch.inference_mode()
def ppsd_decode(base, head, pipeline, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY,
                seed: int = 0, stop_ids: set[int] = frozenset(), oracle=None,
                window: int | None = None) -> Generator[int, None, Generation]:
    """Yield tokens as they are verified; return a Generation whose stats hold one dict per stage."""
    clock, window = Clock(), window or default_window(pipeline)
    lower, rng, n_prompt = base.range(0, head.exit_layer), make_generator(seed), len(prompt_ids)
    last_useful = n_prompt + max_new_tokens - 2  # position p yields generated token p + 1 - n_prompt
    epoch = pipeline.begin(sampling, seed)

    def draft(hidden, pos_ids) -> tuple[int, torch.Tensor | None]:
        d, q = choose(head_logits(base, head, lower, hidden, pos_ids), sampling, rng)
        if oracle is not None:
            d = oracle.draft(int(pos_ids[0, -1]) + 1 - n_prompt, d)
        return d, q

    with clock.phase("prefill"):
        hidden, pos_ids = lower_step(base, lower, torch.tensor([prompt_ids], device=base.device), 0)
        pipeline.send_work(epoch, 0, hidden)
        x, q = draft(hidden, pos_ids)
        pipeline.send_draft(epoch, n_prompt - 1, x, q)
    in_flight, next_pos = deque([n_prompt - 1]), n_prompt  # positions whose verdict is due; the next to draft
    tokens, accept_lengths, run, verified, accepted, flushes = [], [], 0, 0, 0, 0
    try:
        while True:
            verdicts = []
            if len(in_flight) < window and next_pos <= last_useful and x not in stop_ids:
                with clock.phase("compute"):
                    hidden, pos_ids = lower_step(base, lower, torch.tensor([[x]], device=base.device), next_pos)
                pipeline.send_work(epoch, next_pos, hidden)
                verdicts = pipeline.poll_verdicts()  # a rejection already here makes this position stale
                with clock.phase("compute", "head"):  # a stale position's DRAFT is answered without the head
                    x, q = draft(hidden, pos_ids) if all(v.accepted for v in verdicts) else (NO_DRAFT, None)
                pipeline.send_draft(epoch, next_pos, x, q)
                in_flight.append(next_pos)
                next_pos += 1
            verdicts = verdicts or pipeline.poll_verdicts()
            if not verdicts and (len(in_flight) >= window or next_pos > last_useful or x in stop_ids):
                if not in_flight:
                    raise RuntimeError("ppsd: nothing in flight and nothing to draft (decoder bug)")
                with clock.phase("blocked"):
                    verdicts = [pipeline.recv_verdict()]
            for verdict in verdicts:
                pos = in_flight.popleft()
                if verdict.pos != pos or verdict.epoch != epoch:
                    raise RuntimeError(f"ppsd: verdict for position {verdict.pos} epoch {verdict.epoch}, "
                                       f"expected {pos} epoch {epoch} (decoder bug)")
                tokens.append(verdict.token)
                verified, accepted, run = verified + 1, accepted + verdict.accepted, run + 1
                yield verdict.token
                if verdict.token in stop_ids or len(tokens) >= max_new_tokens:
                    accept_lengths.append(run)
                    return _generation(pipeline, epoch, clock, tokens, n_prompt, verified, accepted, accept_lengths,
                                       flushes, window)
                if not verdict.accepted:  # flush: restart after `pos` from the model's token
                    accept_lengths.append(run)
                    run, epoch, flushes = 0, epoch + 1, flushes + 1
                    lower.crop(pos + 1)
                    in_flight.clear()
                    next_pos, x = pos + 1, verdict.token
                    break  # the last stage sends nothing more for the old epoch
    except GeneratorExit:  # the consumer stopped early: close the request so the stages are reusable
        pipeline.end(epoch)
        raise


def _generation(pipeline, epoch: int, clock: Clock, tokens: list[int], n_prompt: int, verified: int, accepted: int,
                accept_lengths: list[int], flushes: int, window: int) -> Generation:
    """Close the request (every stage's stats come back) and make the answer's Generation."""
    send_s = pipeline.link.send_s
    stage_stats = pipeline.end(epoch)
    me = StageStats.from_clock(clock, clock.count["head"], send_s=send_s, flushes=flushes)
    per_stage = [s.summary(r) for s, r in zip([me] + stage_stats, pipeline.layout)]
    return Generation(tokens=tokens, method="ppsd", wall_time=me.wall_s, prompt_tokens=n_prompt,
                      drafts_verified=verified, drafts_accepted=accepted, accept_lengths=accept_lengths,
                      stats={"stages": per_stage, "window": window, "flushes": flushes,
                             "feedback_s": pipeline.feedback_s, "prefill_s": me.prefill_s, "polls": pipeline.polls})
