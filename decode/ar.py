"""Plain autoregressive decoding with a KV cache: the baseline every ratio is measured against."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from decode.common import GREEDY, Generation, Sampling, Timer, choose, make_generator, positions


@torch.inference_mode()
def ar_decode(base, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY, seed: int = 0,
              stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Yield each new token as it is computed; return a Generation (stats: token_s = mean decode step)."""
    start = time.perf_counter()
    generator = make_generator(seed)
    model = base.range(0, base.num_layers)
    ids = torch.tensor([prompt_ids], device=base.device)
    hidden = model.forward(base.embed(ids), positions(0, len(prompt_ids), base.device))
    token, next_ids = _next(base.logits(hidden[:, -1:])[0, -1], sampling, generator)
    prefill_s = time.perf_counter() - start
    tokens, step = [], Timer()
    while True:
        tokens.append(token)
        yield token
        if token in stop_ids or len(tokens) >= max_new_tokens:
            break
        with step:
            hidden = model.forward(base.embed(next_ids), positions(model.length, 1, base.device))
            token, next_ids = _next(base.logits(hidden)[0, -1], sampling, generator)
    return Generation(tokens=tokens, method="ar", wall_time=time.perf_counter() - start,
                      prompt_tokens=len(prompt_ids), accept_lengths=[1] * len(tokens),
                      stats={"prefill_s": prefill_s, "token_s": step.mean, "steps": step.count})


def _next(logits: torch.Tensor, sampling: Sampling, generator) -> tuple[int, torch.Tensor]:
    """The next token, as a host int (the one device-to-host read per token) and as the next step's (1, 1) input.
    Greedy keeps the argmax on the device, so the next step needs no host-to-device copy."""
    if sampling.greedy:
        next_ids = torch.argmax(logits).view(1, 1)
        return int(next_ids), next_ids
    token, _ = choose(logits, sampling, generator)
    return token, torch.tensor([[token]], device=logits.device)


def repeatable_step(base, prompt_ids: list[int]) -> Callable[[], int]:
    """One AR decode step after `prompt_ids`, callable again and again (the cache is rolled back after
    each call): what the thread-count measurement times."""
    model = base.range(0, base.num_layers)
    n = len(prompt_ids)
    with torch.inference_mode():
        model.forward(base.embed(torch.tensor([prompt_ids], device=base.device)), positions(0, n, base.device))
    last = torch.tensor([prompt_ids[-1:]], device=base.device)

    @torch.inference_mode()
    def step() -> int:
        hidden = model.forward(base.embed(last), positions(n, 1, base.device))
        token = int(torch.argmax(base.logits(hidden)[0, -1]))
        model.crop(n)
        return token

    return step
