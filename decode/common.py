"""What every decoder shares: the result type, the stage-0 draft step, and the oracle-acceptance instrument.
Token choice and the speculative accept rule are heads/sampling.py's (`choose`, `verify`), re-exported here.

Greedy decoding is the temperature -> 0 case of sampling: `choose` takes the argmax and `verify`
accepts a draft iff it equals the model's argmax, so one code path serves both.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from decode.measure import acceptance, figures
from heads.errors import UserError
from heads.sampling import GREEDY, Sampling, choose, make_generator, verify  # noqa: F401 (the loops' sampler)


@dataclass
class Generation:
    """One decoded answer and how it was produced (the same fields for ar, eesd and ppsd)."""

    tokens: list[int]                 # generated token ids (the prompt is not included)
    method: str
    wall_time: float                  # seconds from the first prefill op to the last token
    prompt_tokens: int = 0
    drafts_verified: int = 0          # drafts made from the verified prefix and checked by the full model
    drafts_accepted: int = 0          # of those, equal to (greedy) / accepted as (sampling) the model's token
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per verification step/run
    first_token_s: float | None = None  # seconds from the call to the first token (prefill + its verdict; set by Decoder)
    stats: dict = field(default_factory=dict)  # method-specific timings (listed where ar.py, eesd.py, ppsd.py build it)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    # this answer's figures, computed as decode.measure computes them over many
    @property
    def tokens_per_s(self) -> float:
        return figures([self])["tokens_per_s"]

    @property
    def acceptance_rate(self) -> float | None:
        return acceptance([self])

    @property
    def mean_accept_length(self) -> float:
        return figures([self])["mean_accepted_length"]


class Decoding:
    """A decode loop being run: iterate it for its tokens; once it has ended, `result` is the Generation it returned."""

    def __init__(self, loop: Generator[int, None, Generation]):
        self.loop, self.result = loop, None

    def __iter__(self) -> Iterator[int]:
        self.result = yield from self.loop


def run_to_end(loop: Generator[int, None, Generation]) -> Generation:
    """Drain a decode loop and return the Generation it returned."""
    decoding = Decoding(loop)
    for _ in decoding:
        pass
    return decoding.result


class OracleDrafts:
    """An instrument, never a head: the draft for generated token k is `reference[k]` with probability
    `alpha` and a wrong token otherwise (independently per k, reproducible from `seed`).

    Stage 0 still computes layers [0, E) + head + LM head, so every cost is the real one; only the
    token it forwards is replaced. `reference` should be the greedy AR output for the same prompt
    and max_new_tokens, so acceptance is exactly this coin (beyond the reference, the real draft is used).
    """

    def __init__(self, reference: Sequence[int], alpha: float, seed: int = 0, vocab_size: int | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"oracle alpha={alpha} must be in [0, 1]")
        self.reference = list(reference)
        self.alpha = alpha
        self.seed = seed
        self.vocab_size = vocab_size

    def hit(self, index: int) -> bool:
        return random.Random(self.seed * 1_000_003 + index).random() < self.alpha

    def draft(self, index: int, computed: int) -> int:
        """The token to forward as the draft of generated token `index` (0 = first new token)."""
        if not 0 <= index < len(self.reference):
            return computed
        right = self.reference[index]
        if self.hit(index):
            return right
        wrong = right + 1
        return wrong % self.vocab_size if self.vocab_size else wrong


# ---- the stage-0 draft step (shared by eesd and ppsd) -------------------------------------------

def positions(start: int, count: int, device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device)[None]


def head_hidden(base, head, hidden: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Exit head on h_E (B, T, H): a transformer head attends over earlier positions through its own
    slot of the stage-0 cache, so cropping that cache rolls the head back too."""
    if not head.needs_cache:
        return head(hidden)
    mask = base.attention_masks(hidden, position_ids, cache, layer_idx=head.layer_index)["full_attention"]
    return head(hidden, position_embeddings=base.position_embeddings(hidden, position_ids),
                attention_mask=mask, position_ids=position_ids, cache=cache)


def lower_step(base, lower, token_ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding + layers [0, E) on tokens at positions [start, start+T): (h_E, their position ids)."""
    pos = positions(start, token_ids.shape[1], token_ids.device)
    return lower.forward(base.embed(token_ids), pos), pos


def head_logits(base, head, lower, hidden: torch.Tensor, pos: torch.Tensor, with_logits: bool = True):
    """Exit head on h_E, then the draft logits of the last position (None: only keep the head's cache in step).
    On a compiled runtime head + final norm + LM head are one captured step, like the layers before them."""
    if not (with_logits or head.needs_cache):
        return None  # an MLP head keeps no state between positions
    runtime, count = lower.runtime, hidden.shape[1]
    if not runtime.compiles(lower.length - count, count):  # the layers' own rule (they have counted these positions)
        return _head_logits(base, head, hidden, pos, lower.cache, with_logits)
    step = runtime.compiled(("head", id(head), with_logits), functools.partial(_head_logits, base, head,
                                                                               with_logits=with_logits))
    key = ("head", id(head), with_logits, count, getattr(lower.cache, "max_len", 0))
    return runtime.call(key, step, hidden, pos, lower.cache)


def _head_logits(base, head, hidden, pos, cache, with_logits: bool):
    out = head_hidden(base, head, hidden, pos, cache)
    return base.logits(out[:, -1:])[0, -1] if with_logits else None


def draft_step(base, head, lower, token_ids: torch.Tensor, start: int, with_logits: bool = True):
    """Layers [0, E) + exit head on tokens at positions [start, start+T): (h_E, draft logits of the last
    position or None). The head runs on every position so its cache stays in step with the layers'."""
    hidden, pos = lower_step(base, lower, token_ids, start)
    return hidden, head_logits(base, head, lower, hidden, pos, with_logits)
