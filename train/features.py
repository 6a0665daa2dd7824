"""What the heads train on: the frozen base's hidden states, from one forward per batch for every head.

The forward collects the hidden state after each exit layer and the final hidden state, whose final norm + LM
head give the teacher's distribution on the fly. By default those hidden states are computed once per example
and kept in memory across epochs (`cache_features`), since on a CPU the base forward is what costs; the teacher
logits are still recomputed from the frozen base every step, so nothing the size of the vocabulary is ever stored.

The frozen base's forward runs its matmuls in `matmul_dtype` under autocast (bf16: ~2x faster on CPU).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from train import data as D


def matmul_dtype(base, dtype) -> torch.dtype:
    """The torch dtype a `matmul_dtype` setting names (None / "null": the base's own)."""
    return getattr(torch, str(dtype)) if dtype not in (None, "null", "None") else base.dtype


def autocast(base, dtype):
    """Run the frozen base's matmuls in `dtype` (None / the base dtype: no autocast)."""
    dtype = matmul_dtype(base, dtype)
    return torch.autocast(base.device.type, dtype=dtype, enabled=dtype != base.dtype)


class FeatureSource:
    """Hidden states after every exit layer and after the last layer, from one frozen-base forward.

    With `keep=True` each example's states are computed once and reused across epochs.
    """

    def __init__(self, base, exit_layers: list[int], keep: bool, batch_size: int, autocast_dtype=None):
        self.base, self.exit_layers, self.keep, self.batch_size = base, exit_layers, keep, batch_size
        self.autocast_dtype = autocast_dtype
        self.store: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    @torch.no_grad()
    def _forward(self, examples: list[D.Example]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        base = self.base
        batch = D.pad_batch(examples, pad_id=0)
        ids, mask = batch["input_ids"].to(base.device), batch["attention_mask"].to(base.device)
        pos = torch.arange(ids.shape[1], device=base.device)[None].expand_as(ids)
        h, taps, start = base.embed(ids), [], 0
        with autocast(base, self.autocast_dtype):
            for end in self.exit_layers + [base.num_layers]:
                h = base.run_layers(h, start, end, position_ids=pos, attention_mask=mask)
                taps.append(h.to(base.dtype))  # stored in the base dtype: the head trains in it
                start = end
        out = []
        for i, e in enumerate(examples):
            n, lp = len(e.input_ids), e.loss_positions
            out.append(([t[i, :n].clone() for t in taps[:-1]], taps[-1][i, lp.start:lp.stop].clone()))
        return out

    def precompute(self, examples: list[tuple[int, D.Example]], progress: bool) -> None:
        todo = sorted((x for x in examples if x[0] not in self.store), key=lambda x: len(x[1].input_ids))
        bar = tqdm(total=sum(len(e.input_ids) for _, e in todo), desc="frozen-base forward", unit="tok",
                   disable=not progress or not todo, dynamic_ncols=True)
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b:b + self.batch_size]
            for (key, e), feats in zip(chunk, self._forward([e for _, e in chunk])):
                self.store[key] = feats
            bar.update(sum(len(e.input_ids) for _, e in chunk))
        bar.close()

    def get(self, keyed: list[tuple[int, D.Example]]):
        if self.keep:
            self.precompute(keyed, progress=False)
            return [self.store[k] for k, _ in keyed]
        return self._forward([e for _, e in keyed])


def collate(base, keyed, feats, exit_layers):
    """Right-pad the exit-layer states; flatten the loss positions' final states (teacher input)."""
    examples = [e for _, e in keyed]
    width = max(len(e.input_ids) for e in examples)
    hidden = {}
    for j, layer in enumerate(exit_layers):
        h = torch.zeros(len(examples), width, base.hidden_size, dtype=base.dtype, device=base.device)
        for i, (states, _) in enumerate(feats):
            h[i, :states[j].shape[0]] = states[j]
        hidden[layer] = h
    batch = D.pad_batch(examples, pad_id=0)
    return {"hidden": hidden, "final": torch.cat([f for _, f in feats]),
            "attention_mask": batch["attention_mask"].to(base.device), "loss_mask": batch["loss_mask"].to(base.device)}
