"""A Llama-shaped model of random weights made on the device (Llama-2-7B's shape by default, any shape on the
command line), and what one device measures of it: the AR and verify steps of the whole model, one layer's step,
one tensor-parallel shard of a layer, each against the memory-bandwidth bound. `scripts/runtime_bench.py --model 7b`
prints them; `scripts.gpu_check` runs them on a GPU."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

import torch

from decode.ar import ar_decode
from decode.common import run_to_end
from heads import UserError
from heads.hardware import median_seconds
from scripts.overhead import captured_call

PROMPT = list(range(100, 120))


def unique_bytes(parameters) -> int:
    """Bytes a step reads from these weights, a tied embedding / LM head counted once."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in parameters}.values())


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ar_ms(base, tokens: int, repeats: int = 3, captured: bool = False) -> float:
    """Mean AR decode step (prefill excluded), best of `repeats`, after a warm-up that captures the graphs.
    captured: the whole step replayed as one hand-captured graph (on a CPU: run directly); else the compiled layer
    range called per token."""
    base.runtime.step_graphs = captured
    with torch.inference_mode():
        run_to_end(ar_decode(base, PROMPT, 8))
        return min(run_to_end(ar_decode(base, PROMPT, tokens)).stats["token_s"] for _ in range(repeats)) * 1e3


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), the bound a decode step streams at."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")  # the bound: the fastest copy, not the median one
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


@dataclass(frozen=True)
class Shape:
    """A Llama's shape; the defaults are Llama-2-7B's (6.7 B parameters, 13.5 GB in bf16)."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    vocab: int = 32000

    def shard(self, ways: int) -> "Shape":
        """One tensor-parallel shard: heads and MLP columns split `ways` ways, the hidden size kept."""
        if self.heads % ways or self.kv_heads % ways or self.intermediate % ways:
            raise UserError(f"{ways} shards do not divide {self.heads} heads, {self.kv_heads} KV heads and "
                            f"{self.intermediate} MLP columns evenly")
        return replace(self, heads=self.heads // ways, kv_heads=self.kv_heads // ways,
                       intermediate=self.intermediate // ways)


def random_llama(shape: Shape, device, dtype=torch.bfloat16):
    """A Llama of `shape` with random weights made directly on `device` (laid out on the meta device, then
    allocated there: no host copy of 13.5 GB, no download), as a `Base`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from heads.base import Base

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    # to_empty leaves buffers unset: the rotary frequencies are computed anew on the device
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model.eval()
    return Base(model, tokenizer=None, name=f"random-llama-{shape.layers}x{shape.hidden}", folder=None,
                loaded_layers=range(shape.layers))


def timed_ms(device, call, repeats: int) -> float:
    """Median wall time of `call` in ms (the device synchronized around each call)."""
    return median_seconds(call, repeats, device=device) * 1e3


def verify_ms(base, positions_count: int, repeats: int) -> float:
    """One compiled step of `positions_count` positions through every layer + the LM head on each (EESD's and
    PPSD's verify pass of γ + 1 positions), the cache rolled back after each; the first call captures."""
    model = base.range(0, base.num_layers)
    device, n = base.device, len(PROMPT)
    ids = torch.tensor([PROMPT], device=device)
    draft = ids[:, :positions_count]
    pos = torch.arange(n, n + positions_count, device=device)[None]

    def step():
        hidden = model.forward(base.embed(draft), pos)
        base.logits(hidden).argmax(-1)
        model.crop(n)

    with torch.inference_mode():
        model.forward(base.embed(ids), torch.arange(n, device=device)[None])
        step()  # capture
        return timed_ms(device, step, repeats)


def model_7b(device, shape: Shape = Shape(), *, tokens: int = 32, gamma: int = 4, repeats: int = 20,
             bandwidth_gb_s: float | None = None) -> dict:
    """A whole Llama-7B-shaped model, random bf16 weights made on the device, compiled static runtime: the AR
    step (embedding, every layer, LM head, argmax), a γ + 1-position verify step, the capture time and the
    bound (every weight's bytes at `bandwidth_gb_s`, or at the copy bandwidth measured here)."""
    start = time.perf_counter()
    base = random_llama(shape, device)
    sync(device)
    out = {"shape": asdict(shape), "setup_s": round(time.perf_counter() - start, 1)}
    weight_bytes = unique_bytes(base.model.parameters())
    if bandwidth_gb_s is None:
        bandwidth_gb_s, out["bandwidth_source"] = copy_bandwidth(device) / 1e9, "measured copy"
    else:
        out["bandwidth_source"] = "stated"
    out |= {"weights_gb": round(weight_bytes / 1e9, 3), "bandwidth_gb_s": round(bandwidth_gb_s, 1),
            "bound_ms": round(weight_bytes / (bandwidth_gb_s * 1e9) * 1e3, 4)}
    base.set_runtime(compile=True)
    out["runtime"] = base.runtime.describe()
    # the captured step first: the figure that says whether the per-call floor is gone
    out["ar_captured_ms"] = round(ar_ms(base, tokens, repeats=3, captured=True), 4)
    out["captured_capture_s"] = round(base.runtime.capture_s, 1)
    out["captured_over_bound"] = round(out["ar_captured_ms"] / out["bound_ms"], 2)
    print(json.dumps({"model_7b": out}), flush=True)  # what a caller keeps if its time budget ends here
    out["ar_ms"] = round(ar_ms(base, tokens, repeats=3), 4)
    out[f"verify_{gamma + 1}_ms"] = round(verify_ms(base, gamma + 1, repeats), 4)
    out["capture_s"] = round(base.runtime.capture_s, 1)
    out["ar_over_bound"] = round(out["ar_ms"] / out["bound_ms"], 2)
    del base
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def layer_step_ms(base, count: int, cached: int, repeats: int, captured: bool = False) -> float:
    """One layer range call of `count` positions after `cached` positions, rolled back after each. captured: from
    fixed buffers, one replay of a hand-captured graph per call (on a CPU the compiled step called directly)."""
    device, hidden = base.device, base.hidden_size
    r = base.range(0, base.num_layers)
    with torch.inference_mode():
        r.forward(torch.randn(1, cached, hidden, device=device, dtype=base.dtype), torch.arange(cached, device=device)[None])
        x = torch.randn(1, count, hidden, device=device, dtype=base.dtype)
        pos = torch.arange(cached, cached + count, device=device)[None]
        call = captured_call(r, x, pos) if captured else (lambda: r.forward(x, pos))

        def step():
            call()
            r.crop(cached)

        step()  # capture
        return timed_ms(device, step, repeats)


def layer_7b(device, repeats: int = 50, shape: Shape = Shape()) -> dict:
    """One Llama-7B-shaped layer on 256 cached positions: ms per step of 1 and 8 positions, eager vs compiled (the
    layer range's compiled step) vs captured (one hand-captured graph replayed per call)."""
    base = random_llama(replace(shape, layers=1, vocab=32), device)
    weight_bytes = unique_bytes(base.model.model.layers.parameters())
    out = {"bound_ms": round(weight_bytes / copy_bandwidth(device) * 1e3, 4)}
    for mode in ("eager", "compiled", "captured"):
        base.set_runtime(compile=mode != "eager")
        for count in (1, 8):
            out[f"{mode}_{count}_ms"] = round(layer_step_ms(base, count, 256, repeats, captured=mode == "captured"), 4)
    return out


def tp_shards(device, shards=(1, 2, 4, 8), repeats: int = 50, shape: Shape = Shape(),
              allreduce_ms: float | None = None) -> dict:
    """Tensor-parallel AR's per-layer cost on S devices, measured on one: one compiled layer whose heads and MLP
    are split S ways (what each device runs), 1 position after 256 cached, per S; plus the two all-reduces of
    a hidden state per layer, which one device cannot measure: `allreduce_ms` is stated, and said so."""
    out = {"shard_ms": {}, "weights_mb": {}, "shard_captured_ms": {}}
    for ways in shards:
        base = random_llama(replace(shape.shard(ways), layers=1, vocab=32), device)
        base.set_runtime(compile=True)
        out["weights_mb"][ways] = round(unique_bytes(base.model.model.layers.parameters()) / 1e6, 2)
        out["shard_ms"][ways] = round(layer_step_ms(base, 1, 256, repeats), 4)
        # the same call replayed as one hand-captured graph: is the per-call floor gone?
        out["shard_captured_ms"][ways] = round(layer_step_ms(base, 1, 256, repeats, captured=True), 4)
        print(json.dumps({"tp_shards": out}), flush=True)  # what a caller keeps if its time budget ends here
    if allreduce_ms is not None:
        out["allreduce_ms"], out["allreduce_source"] = allreduce_ms, "assumed (one device: not measured)"
        out["tp_layer_ms"] = {s: round(ms + (2 * allreduce_ms if s > 1 else 0), 4) for s, ms in out["shard_ms"].items()}
    return out
