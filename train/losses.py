"""Distillation loss and the two acceptance metrics; pure functions of (student, teacher) logits (P, V).

A multi-exit job scores several students against one teacher per step, so the teacher's argmax,
probabilities and log-probabilities can be passed in (`TeacherView`) instead of being recomputed per head: over a 49,152-wide
vocabulary each costs about as much as a student's loss on a CPU."""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from heads.schema import LOSSES


@dataclass
class TeacherView:
    """The teacher's logits with the derived tensors every head's loss and metrics share, computed once."""

    logits: torch.Tensor

    @cached_property
    def argmax(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    @cached_property
    def probs(self) -> torch.Tensor:
        return F.softmax(self.logits.float(), dim=-1)

    def log_probs(self, temperature: float) -> torch.Tensor:
        """log softmax(logits / T), kept per temperature (the KL target)."""
        cache = self.__dict__.setdefault("_log_probs", {})
        if temperature not in cache:
            cache[temperature] = F.log_softmax(self.logits.float() / temperature, dim=-1)
        return cache[temperature]


def _view(teacher) -> TeacherView:
    return teacher if isinstance(teacher, TeacherView) else TeacherView(teacher)


def kl_loss(student: torch.Tensor, teacher, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton) so gradients keep their scale."""
    t = _view(teacher).log_probs(temperature)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def argmax_ce_loss(student: torch.Tensor, teacher) -> torch.Tensor:
    """Cross-entropy to the teacher's greedy token: the quantity greedy acceptance counts."""
    return F.cross_entropy(student.float(), _view(teacher).argmax)


def topk_loss(student: torch.Tensor, teacher, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy to the teacher's top-k tokens, weighted by their probabilities at temperature T renormalised
    over the k (soft targets without the long tail KL also fits); the student at T = 1, so k = 1 is `ce`."""
    top = _view(teacher).logits.float().topk(k, dim=-1)
    target = F.softmax(top.values / temperature, dim=-1)
    return -(target * F.log_softmax(student.float(), dim=-1).gather(-1, top.indices)).sum(-1).mean()


def distill_loss(student, teacher, kind: str = "kl", temperature: float = 1.0, ce_weight: float = 0.5, top_k: int = 8):
    """`teacher`: logits (P, V) or a TeacherView of them."""
    if kind == "kl":
        return kl_loss(student, teacher, temperature)
    if kind == "ce":
        return argmax_ce_loss(student, teacher)
    if kind == "mix":
        return (1 - ce_weight) * kl_loss(student, teacher, temperature) + ce_weight * argmax_ce_loss(student, teacher)
    if kind == "topk":
        return topk_loss(student, teacher, top_k, temperature)
    raise ValueError(f"unknown loss '{kind}': use one of {LOSSES}")


@torch.no_grad()
def top1_agreement(student: torch.Tensor, teacher) -> torch.Tensor:
    """Fraction of positions where the head's argmax is the base's: the greedy acceptance rate α."""
    return (student.argmax(-1) == _view(teacher).argmax).float().mean()


@torch.no_grad()
def expected_acceptance(student: torch.Tensor, teacher) -> torch.Tensor:
    """E[sum_v min(p_v, q_v)]: the acceptance rate of speculative sampling at temperature 1."""
    p = _view(teacher).probs
    q = F.softmax(student.float(), dim=-1)
    return torch.minimum(p, q).sum(-1).mean()
