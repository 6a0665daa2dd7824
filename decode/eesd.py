"""Early-exit self-speculative decoding: draft γ tokens with layers [0, E) + the exit head, verify
them in one pass of layers [E, N), keep the longest matching prefix plus the model's own token.

The draft's layer-[0, E) KV entries are the verifier's too (one cache per layer range), so after
verification both ranges are cropped to the accepted length: the rollback is a crop.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from decode.clock import Clock
from decode.common import GREEDY, Generation, Sampling, choose, draft_step, make_generator, positions, verify


@torch.inference_mode()
def eesd_decode(base, head, prompt_ids: list[int], max_new_tokens: int, *, gamma: int = 4, sampling: Sampling = GREEDY,
                seed: int = 0, stop_ids: set[int] = frozenset(), oracle=None) -> Generator[int, None, Generation]:
    """Yield tokens as each round is verified; return a Generation.

    stats: draft_s (one draft token: [0, E) + head + LM head), verify_s {k: one pass over k positions:
    the last draft through [0, E) + head, then [E, N) + LM head on all k}, rounds.
    """
    clock = Clock()
    draft_rng, verify_rng = make_generator(seed), make_generator(seed + 1)
    exit_layer, device = head.exit_layer, base.device
    lower, upper = base.range(0, exit_layer), base.range(exit_layer, base.num_layers)
    n_prompt = len(prompt_ids)

    with clock.phase("prefill"):
        hidden, _ = draft_step(base, head, lower, torch.tensor([prompt_ids], device=device), 0, with_logits=False)
        logits = base.logits(upper.forward(hidden, positions(0, n_prompt, device))[:, -1:])[0, -1]
        token, _ = choose(logits, sampling, verify_rng)
    tokens, accept_lengths = [token], [1]  # the prefill step emits one token
    verified = accepted = 0
    yield token

    on_device = sampling.greedy and oracle is None  # greedy: drafts stay on the device, one host read per round
    while token not in stop_ids and len(tokens) < max_new_tokens:
        pos = n_prompt + len(tokens) - 1            # position of `token`, the last verified one
        budget = min(gamma, max_new_tokens - len(tokens) - 1)  # a round emits at most budget + 1 tokens
        if on_device:  # compiled: always γ drafts, so one verify shape is captured (the last round's extra is cut)
            count = gamma if base.runtime.compile else budget
            new, n_ok, k = _greedy_round(base, head, lower, upper, token, pos, count, stop_ids, clock)
            new, n_ok, k = new[:budget + 1], min(n_ok, budget), min(k, budget)
        else:
            new, n_ok, k = _sampled_round(base, head, lower, upper, token, pos, budget, stop_ids, clock, sampling,
                                          (draft_rng, verify_rng), oracle, pos + 1 - n_prompt)
        verified, accepted = verified + n_ok + (n_ok < k), accepted + n_ok  # drafts after a miss don't count
        keep = pos + n_ok + 1                    # positions [0, keep) hold verified inputs
        lower.crop(keep), upper.crop(keep)
        tokens.extend(new)
        yield from new
        accept_lengths.append(len(new))
        token = tokens[-1]
    return Generation(tokens=tokens, method="eesd", wall_time=clock.elapsed(), prompt_tokens=n_prompt,
                      drafts_verified=verified, drafts_accepted=accepted, accept_lengths=accept_lengths,
                      stats={"prefill_s": clock.wall["prefill"], "gamma": gamma, "rounds": len(accept_lengths),
                             "draft_s": clock.mean("draft"),
                             "verify_s": {k: clock.mean(("verify", k)) for k in clock.keys("verify")}})


def _sampled_round(base, head, lower, upper, token: int, pos: int, budget: int, stop_ids, clock: Clock,
                   sampling: Sampling, rngs, oracle, first: int) -> tuple[list[int], int, int]:
    """One round with drafts chosen on the host (sampled, or an oracle's; `first`: the index among the generated
    tokens of the round's first draft): up to `budget` drafts, one verify pass, the speculative rule on each draft
    (decode.common.verify) and the bonus token when all are accepted. Returns (new tokens, drafts accepted, drafts made)."""
    draft_rng, verify_rng = rngs
    device = base.device
    hiddens, drafts, draft_qs, x = [], [], [], token
    for j in range(budget):
        with clock.phase("draft"):
            h, draft_logits = draft_step(base, head, lower, torch.tensor([[x]], device=device), pos + j)
            x, q = choose(draft_logits, sampling, draft_rng)
            if oracle is not None:
                x = oracle.draft(first + j, x)
        hiddens.append(h), drafts.append(x), draft_qs.append(q)
        if x in stop_ids:  # drafting past an end-of-sequence token is wasted work
            break
    k = len(drafts)
    with clock.phase(("verify", k + 1)):
        h, _ = draft_step(base, head, lower, torch.tensor([[x]], device=device), pos + k, with_logits=False)
        hidden = upper.forward(torch.cat(hiddens + [h], dim=1), positions(pos, k + 1, device))
        all_logits = base.logits(hidden)[0]
    new, n_ok = [], 0
    for i in range(k):
        y, ok = verify(all_logits[i], drafts[i], draft_qs[i], sampling, verify_rng)
        new.append(y)
        if not ok:
            break
        n_ok += 1
    if n_ok == k and not (k and drafts[-1] in stop_ids):
        y, _ = choose(all_logits[k], sampling, verify_rng)  # every draft accepted: the bonus token
        new.append(y)
    return new, n_ok, k


def _greedy_round(base, head, lower, upper, token: int, pos: int, budget: int, stop_ids,
                  clock: Clock) -> tuple[list[int], int, int]:
    """One greedy round with every token kept on the device until the verdict: `budget` drafts (each the
    argmax of the last, fed back as a tensor), one verify pass, then a single read of the model's tokens and
    the drafts. Returns (new tokens, cut after a stop id; drafts accepted; drafts made)."""
    device = base.device
    x = torch.tensor([[token]], device=device)
    hiddens, drafts = [], []
    for j in range(budget):
        with clock.phase("draft"):
            h, draft_logits = draft_step(base, head, lower, x, pos + j)
            x = draft_logits.argmax(-1).view(1, 1)
        hiddens.append(h), drafts.append(x)
    k = len(drafts)
    with clock.phase(("verify", k + 1)):
        h, _ = draft_step(base, head, lower, x, pos + k, with_logits=False)
        hidden = upper.forward(torch.cat(hiddens + [h], dim=1), positions(pos, k + 1, device))
        model = base.logits(hidden)[0].argmax(-1)
        read = torch.cat([model] + [d.view(1) for d in drafts]).tolist()  # the round's one device -> host sync
    model, drafted = read[:k + 1], read[k + 1:]
    n_ok = next((i for i in range(k) if drafted[i] != model[i]), k)
    new = model[:n_ok + 1]
    stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
    return (new if stop is None else new[:stop + 1]), n_ok, k
