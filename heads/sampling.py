"""The one sampler: every decode method (ar, eesd, ppsd's stage 0 and last stage) and the teacher's sampled
answers draw their tokens here.

`Sampling` is temperature, then top-k, then top-p (nucleus) applied to the softmax, in that order (as
Hugging Face's `generate` orders its warpers). Greedy decoding is temperature 0: the argmax, which no filter
changes. Speculative decoding stays lossless under any setting because the draft's q and the verifier's p
are both this same processed distribution: the accept rule then emits tokens distributed exactly as
processed p, i.e. as AR with the same setting would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from heads.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0        # keep the smallest set of most likely tokens whose mass reaches top_p (1: all)
    top_k: int = 0            # keep the k most likely tokens (0: all)

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature={self.temperature}: use 0 (greedy) or a positive number")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p}: use a number in (0, 1] (1 keeps every token)")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise UserError(f"top_k={self.top_k}: use a whole number >= 0 (0 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @classmethod
    def of(cls, setting: "Sampling | float") -> "Sampling":
        """A Sampling, or a bare temperature."""
        return setting if isinstance(setting, Sampling) else cls(temperature=float(setting))


GREEDY = Sampling()


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The processed distribution over the last dimension (float32, on the logits' device): softmax at the
    temperature, then zero outside the top k and outside the nucleus, renormalized. The nucleus is found among
    the top k tokens (k widened until every row's top k hold top_p) rather than by sorting the vocabulary,
    which on a CPU costs as much as a decode step."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    vocab = probs.shape[-1]
    if not sampling.top_k and sampling.top_p >= 1:
        return probs
    k = min(sampling.top_k or 64, vocab)
    while True:
        top, index = probs.topk(k, dim=-1)
        if sampling.top_k:
            top = top / top.sum(-1, keepdim=True)
        if sampling.top_k or k == vocab or bool((top.sum(-1) >= sampling.top_p).all()):
            break
        k = min(vocab, 4 * k)
    if sampling.top_p < 1:
        top = top * ((top.cumsum(-1) - top) < sampling.top_p)  # the most likely token always stays
    return torch.zeros_like(probs).scatter_(-1, index, top / top.sum(-1, keepdim=True))


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token per row of (..., vocab) logits: the argmax, or a draw from `probabilities` (the generator on
    the logits' device)."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, sampling)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


# ---- one position, as the decode loops use it (CPU generators: reproducible whatever the model's device) ----

def choose(logits: torch.Tensor, sampling: Sampling | float, generator: torch.Generator | None) \
        -> tuple[int, torch.Tensor | None]:
    """The next token from one position's logits: argmax (greedy) or a sample.
    Returns (token, its processed distribution q, or None when greedy)."""
    sampling = Sampling.of(sampling)
    if sampling.greedy:
        return int(torch.argmax(logits)), None
    q = probabilities(logits.cpu(), sampling)
    if not bool(torch.isfinite(q).all()):  # a head with NaN/Inf weights: a point-mass draft, which the verifier
        return _point_mass(logits, q)      # judges by the same exact rule (at worst it rejects it)
    return int(torch.multinomial(q, 1, generator=generator)), q


def _point_mass(logits: torch.Tensor, like: torch.Tensor) -> tuple[int, torch.Tensor]:
    token = int(torch.argmax(torch.nan_to_num(logits.float(), nan=float("-inf"))))
    q = torch.zeros_like(like)
    q[token] = 1.0
    return token, q


def verify(logits: torch.Tensor, draft: int, draft_q: torch.Tensor | None, sampling: Sampling | float,
           generator: torch.Generator | None) -> tuple[int, bool]:
    """The model's token at one position given a single draft, and whether the draft was accepted.

    Greedy: accept iff draft == argmax. Sampling: the standard speculative rule on processed p and q (accept
    with probability min(1, p(d)/q(d)), else sample norm(max(p - q, 0))), whose output is distributed exactly
    as p whatever q is (Leviathan et al. 2023, Chen et al. 2023).
    """
    sampling = Sampling.of(sampling)
    if sampling.greedy:
        token = int(torch.argmax(logits))
        return token, token == draft
    p = probabilities(logits.cpu(), sampling)
    if draft_q is None:  # a draft without a distribution (oracle) is a point mass
        draft_q = torch.zeros_like(p)
        draft_q[draft] = 1.0
    draft_q = draft_q.to(p.device)  # the last stage receives q on its communication device
    if not bool(torch.isfinite(draft_q).all()):  # never from `choose`; a point mass keeps the rule exact
        draft_q = torch.zeros_like(p)
        draft_q[draft] = 1.0
    ratio = float(p[draft]) / max(float(draft_q[draft]), 1e-30)
    if float(torch.rand((), generator=generator)) < min(1.0, ratio):
        return draft, True
    residual = torch.clamp(p - draft_q, min=0)
    total = float(residual.sum())
    if total <= 0:  # p == q: cannot happen after a rejection, but never divide by zero
        residual, total = p, 1.0
    return int(torch.multinomial(residual / total, 1, generator=generator)), False
