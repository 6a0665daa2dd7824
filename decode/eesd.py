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

    greedy = sampling.greedy and oracle is None  # drafts stay on the device, one host read per round
    while token not in stop_ids and len(tokens) < max_new_tokens:
        pos = n_prompt + len(tokens) - 1            # position of `token`, the last verified one
        budget = min(gamma, max_new_tokens - len(tokens) - 1)  # a round emits at most budget + 1 tokens
        if greedy:  # compiled: always γ drafts, so one verify shape is captured (the last round's extra is cut)
            drafter = GreedyDrafts(stop_ids)
            count = gamma if base.runtime.compile else budget
        else:
            drafter = SampledDrafts(stop_ids, sampling, draft_rng, verify_rng, oracle, pos + 1 - n_prompt)
            count = budget
        new, n_ok, k = _round(base, head, lower, upper, token, pos, count, clock, drafter)
        new, n_ok, k = new[:budget + 1], min(n_ok, budget), min(k, budget)
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


def _round(base, head, lower, upper, token: int, pos: int, count: int, clock: Clock,
           drafter: "GreedyDrafts | SampledDrafts") -> tuple[list[int], int, int]:
    """One round after verified `token` at `pos`: up to `count` drafts through [0, E) + the head, each fed to the
    next as a (1, 1) tensor; one verify pass (the last draft's [0, E), then [E, N) + LM head over all k + 1
    positions); the drafter's verdict. Returns (new tokens, drafts accepted, drafts made)."""
    device = base.device
    x = torch.tensor([[token]], device=device)
    hiddens = []
    for j in range(count):
        with clock.phase("draft"):
            h, draft_logits = draft_step(base, head, lower, x, pos + j)
            x = drafter.draft(draft_logits)
        hiddens.append(h)
        if drafter.ended():  # drafting past an end-of-sequence token is wasted work
            break
    k = len(hiddens)
    with clock.phase(("verify", k + 1)):
        h, _ = draft_step(base, head, lower, x, pos + k, with_logits=False)
        hidden = upper.forward(torch.cat(hiddens + [h], dim=1), positions(pos, k + 1, device))
        return drafter.verdict(base.logits(hidden)[0])


class GreedyDrafts:
    """Greedy drafts kept on the device until the verdict: each the argmax of the last, then one read of the
    model's argmaxes and the drafts together (the round's one device-to-host sync)."""

    def __init__(self, stop_ids):
        self.stop_ids, self.drafts = stop_ids, []

    def draft(self, logits: torch.Tensor) -> torch.Tensor:
        self.drafts.append(logits.argmax(-1).view(1, 1))
        return self.drafts[-1]

    def ended(self) -> bool:
        return False  # knowing would cost a host read per draft

    def verdict(self, logits: torch.Tensor) -> tuple[list[int], int, int]:
        k = len(self.drafts)
        read = torch.cat([logits.argmax(-1)] + [d.view(1) for d in self.drafts]).tolist()
        model, drafted = read[:k + 1], read[k + 1:]
        n_ok = next((i for i in range(k) if drafted[i] != model[i]), k)
        new = model[:n_ok + 1]
        stop = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        return (new if stop is None else new[:stop + 1]), n_ok, k


class SampledDrafts:
    """Drafts chosen on the host (sampled, or an oracle's; `first`: the index among the generated tokens of the
    round's first draft), judged by the speculative rule (decode.common.verify), with the bonus token when all
    are accepted."""

    def __init__(self, stop_ids, sampling: Sampling, draft_rng, verify_rng, oracle, first: int):
        self.stop_ids, self.sampling, self.oracle, self.first = stop_ids, sampling, oracle, first
        self.draft_rng, self.verify_rng = draft_rng, verify_rng
        self.drafts, self.qs = [], []

    def draft(self, logits: torch.Tensor) -> torch.Tensor:
        x, q = choose(logits, self.sampling, self.draft_rng)
        if self.oracle is not None:
            x = self.oracle.draft(self.first + len(self.drafts), x)
        self.drafts.append(x), self.qs.append(q)
        return torch.tensor([[x]], device=logits.device)

    def ended(self) -> bool:
        return self.drafts[-1] in self.stop_ids

    def verdict(self, logits: torch.Tensor) -> tuple[list[int], int, int]:
        k, new, n_ok = len(self.drafts), [], 0
        for i in range(k):
            y, ok = verify(logits[i], self.drafts[i], self.qs[i], self.sampling, self.verify_rng)
            new.append(y)
            if not ok:
                break
            n_ok += 1
        if n_ok == k and not (k and self.drafts[-1] in self.stop_ids):
            y, _ = choose(logits[k], self.sampling, self.verify_rng)  # every draft accepted: the bonus token
            new.append(y)
        return new, n_ok, k
