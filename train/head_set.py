"""The heads being trained: every exit head of a job in one module, warm-started from a trained head folder if
asked, and scored against the teacher (per step, and held out).

The full-vocabulary LM head, teacher and student side, runs in `matmul_dtype` through one kept copy (the LM
head dominates a step); the heads' own weights and all loss math stay fp32. The teacher's argmax and
probabilities are computed once per step for every head (`TeacherView`). Held-out metrics always use the
exact fp32 teacher.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from heads import UserError, build_head, load_head
from train.features import FeatureSource, collate, matmul_dtype
from train.losses import TeacherView, expected_acceptance, top1_agreement


class HeadSet(nn.Module):
    """Every head of the job; forward = per-head student logits at the loss positions + the teacher's."""

    def __init__(self, base, head_type: str, exit_layers: list[int], mlp_hidden: int, lm_head_dtype=None,
                 mlp_layers: int = 1):
        super().__init__()
        self.heads = nn.ModuleDict({f"L{e}": build_head(base, head_type, e, mlp_hidden=mlp_hidden, mlp_layers=mlp_layers)
                                    for e in exit_layers})
        self.base = [base]  # a list keeps the frozen base out of this module's parameters and checkpoints
        self.lm_head_dtype = lm_head_dtype  # matmul dtype of the frozen LM head; evaluation sets None (exact)
        self.cast_lm_head: dict = {}  # dtype -> (weight, bias) of the frozen LM head in that dtype

    def logits(self, hidden):
        """Final norm + LM head, the matmul in `lm_head_dtype` through one kept copy of the frozen LM head:
        autocast would cast the vocab-wide matrix again on every call (it caches casts of trainable leaves only)."""
        base = self.base[0]
        dtype = matmul_dtype(base, self.lm_head_dtype)
        if dtype == base.dtype:
            return base.logits(hidden)
        head = base.model.lm_head
        if dtype not in self.cast_lm_head:
            self.cast_lm_head[dtype] = (head.weight.detach().to(dtype),
                                        None if head.bias is None else head.bias.detach().to(dtype))
        weight, bias = self.cast_lm_head[dtype]
        return F.linear(base.decoder.norm(hidden).to(dtype), weight, bias)

    def forward(self, batch):
        base = self.base[0]
        mask = batch["loss_mask"]
        with torch.no_grad():
            teacher = self.logits(batch["final"])
        students = {}
        for name, head in self.heads.items():
            h = batch["hidden"][int(name[1:])]
            if head.head_type == "mlp":  # position-wise: only the loss positions need it
                out = head(h[mask])
            else:
                pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
                masks = base.attention_masks(h, pos, attention_mask=batch["attention_mask"])
                out = head(h, position_embeddings=base.position_embeddings(h, pos), position_ids=pos,
                           attention_mask=masks.get(getattr(head.layer, "attention_type", "full_attention"),
                                                    masks["full_attention"]))[mask]
            students[name] = self.logits(out)
        return students, teacher


def warm_start(model: HeadSet, folder: str, base) -> None:
    """Start from a trained head folder (it must fit this base, exit layer and head type)."""
    head = load_head(folder, base)
    name = f"L{head.exit_layer}"
    mine = model.heads[next(iter(model.heads))]
    if name not in model.heads or head.head_type != mine.head_type or \
            (head.head_type == "mlp" and (head.up.out_features, len(head.blocks)) != (mine.up.out_features, len(mine.blocks))):
        raise UserError(f"init_from={folder} is a {head.describe()}, but this job trains {mine.head_type} heads "
                        f"at layers {[int(n[1:]) for n in model.heads]}: match exit_layer, head, head.mlp_hidden and head.mlp_layers")
    model.heads[name].load_state_dict(head.state_dict())


def head_metrics(students: dict, teacher: TeacherView, losses: dict | None = None) -> torch.Tensor:
    """(heads, 3) [loss, top-1 agreement, expected acceptance] on the heads' device: a step's metrics stay
    there until one reduction and one read (a value read per metric would wait for the GPU each time)."""
    rows = []
    for name, s in students.items():
        loss = losses[name].detach().float() if losses else torch.zeros((), device=s.device)
        rows.append(torch.stack([loss, top1_agreement(s, teacher), expected_acceptance(s, teacher)]))
    return torch.stack(rows).double()


@torch.no_grad()
def evaluate(model: HeadSet, base, source: FeatureSource, keyed, exit_layers, batch_size: int) -> dict:
    """Position-weighted held-out top-1 agreement, expected acceptance and loss per head."""
    sums = torch.zeros(len(exit_layers), 2, dtype=torch.float64, device=base.device)  # on the device: no sync per batch
    positions = 0
    lm_head_dtype, model.lm_head_dtype = model.lm_head_dtype, None  # the exact teacher, whatever trained
    for b in range(0, len(keyed), batch_size):
        chunk = keyed[b:b + batch_size]
        batch = collate(base, chunk, source.get(chunk), exit_layers)
        students, teacher = model(batch)
        n = teacher.shape[0]
        sums += head_metrics(students, TeacherView(teacher))[:, 1:] * n
        positions += n
    model.lm_head_dtype = lm_head_dtype
    means = (sums / max(1, positions)).tolist()
    return {name: {"top1": m[0], "expected_acceptance": m[1], "positions": positions}
            for name, m in zip(model.heads, means)}


def evaluate_by_source(model: HeadSet, base, source: FeatureSource, keyed, exit_layers, batch_size: int,
                       source_of: dict) -> tuple[dict, dict]:
    """`evaluate` on the whole held-out set, and with several prompt sources on each source's held-out prompts
    alone ({} with one): a larger prompt set is then still scored on the held-out prompts of the smaller one
    (comparable α). The whole set's metrics are the sources' weighted by positions: no position is scored twice."""
    if len(set(source_of.values())) < 2:
        return evaluate(model, base, source, keyed, exit_layers, batch_size), {}
    subsets = {s: [(i, e) for i, e in keyed if source_of[e.prompt_id] == s] for s in dict.fromkeys(source_of.values())}
    by_source = {s: evaluate(model, base, source, subset, exit_layers, batch_size)
                 for s, subset in subsets.items() if subset}
    total = sum(next(iter(m.values()))["positions"] for m in by_source.values())
    whole = {name: {k: sum(m[name][k] * m[name]["positions"] for m in by_source.values()) / total
                    for k in ("top1", "expected_acceptance")} | {"positions": total}
             for name in next(iter(by_source.values()))}
    return whole, by_source
