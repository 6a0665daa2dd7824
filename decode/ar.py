"""Plain autoregressive decoding with a KV cache: the baseline every ratio is measured against.

Greedy on a static runtime, the whole step (embed → every layer → final norm + LM head → argmax) runs from fixed
buffers as one `GreedyStep`: on CUDA one hand-captured graph replayed per token (heads.runtime.CapturedStep),
whose argmax lands in the buffer the next step reads; the host writes the position and reads the token. On a CPU
the same step runs directly. Sampling (and an eager runtime) calls the layer range step by step."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from decode.clock import Clock
from decode.common import GREEDY, Generation, Sampling, choose, make_generator, positions
from heads.runtime import CapturedStep


class GreedyStep:
    """Greedy AR's step from fixed buffers to fixed buffers: `token` (1, 1) at `position` through every layer to
    its argmax in `next_token`. Made once per runtime (`Runtime.step`), so its graphs outlive a request."""

    def __init__(self, base):
        self.base, self.model = base, None
        d = dict(dtype=torch.long, device=base.device)
        self.token, self.next_token, self.position = (torch.zeros(1, 1, **d) for _ in range(3))
        graphs = "cuda" if base.device.type == "cuda" else None
        self.captured = CapturedStep(self._step, name="greedy AR step", graphs=graphs, log=base.runtime.log)

    def begin(self):
        """A new request: a fresh range over every layer (the runtime's reused cache), returned for the prefill.
        Captured on CUDA, it runs on the runtime's copy for hand-captured steps."""
        self.model = self.base.range(0, self.base.num_layers)
        if self.captured.graphs:
            self.model.runtime = self.model.runtime.for_capture()
        self.captured.ranges = [self.model]
        return self.model

    def _step(self) -> None:
        hidden = self.model.forward(self.base.embed(self.token), self.position)
        self.next_token.copy_(torch.argmax(self.base.logits(hidden)[0, -1]).view(1, 1))

    def __call__(self) -> int:
        """One token: its position written, the step replayed, its argmax fed back on the device and read once."""
        self.position.fill_(self.model.length)
        self.captured(self.model.cache)  # captured once per cache (reserved before the first step)
        self.token.copy_(self.next_token)
        return int(self.token)


def greedy_step(base) -> GreedyStep:
    return base.runtime.step("greedy AR", lambda: GreedyStep(base))


@torch.inference_mode()
def ar_decode(base, prompt_ids: list[int], max_new_tokens: int, *, sampling: Sampling = GREEDY, seed: int = 0,
              stop_ids: set[int] = frozenset()) -> Iterator[int]:
    """Yield each new token as it is computed; return a Generation (stats: token_s = mean decode step)."""
    clock = Clock()
    generator = make_generator(seed)
    runtime = base.runtime
    step = greedy_step(base) if sampling.greedy and runtime.static and runtime.step_graphs else None
    model = step.begin() if step else base.range(0, base.num_layers)
    with clock.phase("prefill"):
        ids = torch.tensor([prompt_ids], device=base.device)
        hidden = model.forward(base.embed(ids), positions(0, len(prompt_ids), base.device))
        token, next_ids = _next(base.logits(hidden[:, -1:])[0, -1], sampling, generator)
        if step:
            model.reserve(len(prompt_ids) + max_new_tokens)
            step.token.copy_(next_ids)
    tokens = []
    while True:
        tokens.append(token)
        yield token
        if token in stop_ids or len(tokens) >= max_new_tokens:
            break
        with clock.phase("step"):
            if step:
                token = step()
            else:
                hidden = model.forward(base.embed(next_ids), positions(model.length, 1, base.device))
                token, next_ids = _next(base.logits(hidden)[0, -1], sampling, generator)
    return Generation(tokens=tokens, method="ar", wall_time=clock.elapsed(),
                      prompt_tokens=len(prompt_ids), accept_lengths=[1] * len(tokens),
                      stats={"prefill_s": clock.wall["prefill"], "token_s": clock.mean("step"),
                             "steps": clock.count["step"]})


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
