"""Batch-invariant decoding kernels: a position's logits get the same bits whether it is computed alone
(AR, PPSD: one position per call) or among the few positions of an EESD verification pass.

Plain kernels do not promise that. Measured on this project's CPUs in bf16: oneDNN's GEMM rounds a row
differently depending on how many rows it multiplies (the MLP down projection, K = 1536: 1 row vs 4
rows differ), and SDPA's multi-query kernel differs from its one-query kernel, so EESD's greedy tokens
drifted from AR's on about half the prompts within 64 tokens. Three changes, for calls of at most
`MAX_ROWS` positions (decode-time shapes; a prefill is longer and identical across methods anyway):

- every decoder-layer linear multiplies fixed blocks of `BLOCK` rows (the last block padded), so a row's
  result never depends on its neighbours (4 rows cost what 1 row does on these memory-bound calls);
- attention with several new queries runs one query at a time over its own causal prefix, the call AR makes;
- the LM head runs one position at a time (padding it to a block would tax AR's every step by ~25 %).

It applies to every method on a base (AR included), so comparisons stay apples to apples. Greedy
EESD then equals AR token for token in bf16 (tests/test_decode_bf16.py); the price is measured in
the README. fp32 did not need it in any run here.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

BLOCK = 4
# The most positions a decode step runs: row-wise here, compiled in heads/runtime.py. EESD's verify pass is
# gamma + 1 positions, so gamma + 1 <= MAX_ROWS where it must stay lossless (heads/schema.py, decode/evaluate.py).
MAX_ROWS = 16
ATTENTION = "ppsd_rowwise_sdpa"


def blocked_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """F.linear over fixed BLOCK-row blocks (calls of at most MAX_ROWS rows; larger ones run as usual).
    The rows go through a scratch buffer kept on the module: a decode step is ~200 of these calls, so
    the wrapper must cost next to nothing."""
    n = x.numel() // x.shape[-1]
    if n > MAX_ROWS:
        return F.linear(x, self.weight, self.bias)
    rows = self.__dict__.get("_rows")  # MAX_ROWS is a multiple of BLOCK: every block fits
    if rows is None or rows.dtype != x.dtype or rows.device != x.device:
        rows = self.__dict__["_rows"] = torch.zeros(MAX_ROWS, x.shape[-1], dtype=x.dtype, device=x.device)
    rows[:n].copy_(x.reshape(n, -1))
    if n <= BLOCK:
        out = F.linear(rows[:BLOCK], self.weight, self.bias)
    else:
        out = torch.cat([F.linear(rows[i:i + BLOCK], self.weight, self.bias) for i in range(0, n, BLOCK)])
    return out[:n].view(*x.shape[:-1], out.shape[-1])


def rowwise_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """F.linear one position at a time for calls of 2..MAX_ROWS positions (the LM head: AR's one-row call)."""
    n = x.numel() // x.shape[-1]
    if n == 1 or n > MAX_ROWS:
        return F.linear(x, self.weight, self.bias)
    rows = x.reshape(n, x.shape[-1])
    out = torch.cat([F.linear(rows[i:i + 1], self.weight, self.bias) for i in range(n)])
    return out.view(*x.shape[:-1], out.shape[-1])


def rowwise_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA, but several new queries over a cache attend one at a time (batch 1, causal, no padding)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if q_len == 1 or q_len == k_len or q_len > MAX_ROWS or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for i in range(q_len):
        end = k_len - q_len + i + 1
        out, _ = sdpa_attention_forward(module, query[:, :, i:i + 1], key[:, :, :end], value[:, :, :end], None, **kwargs)
        rows.append(out)
    return torch.cat(rows, dim=1), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, rowwise_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def apply(model, on: bool = True, *, layers: bool = True) -> None:
    """Switch a loaded causal LM's decoder layers and LM head to the batch-invariant kernels (or back).
    layers=False: the LM head only (compiled steps padded to one row count are invariant by their shape)."""
    if on and layers:
        _register_attention()
    model.config._attn_implementation = ATTENTION if on and layers else "sdpa"
    linears = [(m, blocked_linear) for layer in model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    for module, forward in linears + [(model.lm_head, rowwise_linear)]:
        if on and (layers or module is model.lm_head):
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_rows", None)
