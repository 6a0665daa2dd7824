"""Distillation loss and the two acceptance metrics; pure functions of (student, teacher) logits (P, V)."""

import torch
import torch.nn.functional as F

LOSSES = ("kl", "ce", "mix")


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton) so gradients keep their scale."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def argmax_ce_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's greedy token: the quantity greedy acceptance counts."""
    return F.cross_entropy(student.float(), teacher.argmax(-1))


def distill_loss(student, teacher, kind: str = "kl", temperature: float = 1.0, ce_weight: float = 0.5):
    if kind == "kl":
        return kl_loss(student, teacher, temperature)
    if kind == "ce":
        return argmax_ce_loss(student, teacher)
    if kind == "mix":
        return (1 - ce_weight) * kl_loss(student, teacher, temperature) + ce_weight * argmax_ce_loss(student, teacher)
    raise ValueError(f"unknown loss '{kind}': use one of {LOSSES}")


@torch.no_grad()
def top1_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where the head's argmax is the base's: the greedy acceptance rate α."""
    return (student.argmax(-1) == teacher.argmax(-1)).float().mean()


@torch.no_grad()
def expected_acceptance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """E[sum_v min(p_v, q_v)]: the acceptance rate of speculative sampling at temperature 1."""
    p = F.softmax(teacher.float(), dim=-1)
    q = F.softmax(student.float(), dim=-1)
    return torch.minimum(p, q).sum(-1).mean()
