"""python -m scripts.overhead: where the time of one AR decode step goes on a tiny random Llama (compute ≈ 0, so
what is left is per-call host overhead: the part the compiled runtime removes; scripts/runtime_bench.py measures
that runtime against it).

    python -m scripts.overhead --layers 30 --tokens 64 [--threads 1] [--model FOLDER] [--device cuda] [--floor-only]

Prints, for fp32 and bf16 with batch-invariant kernels off and on: the AR step (ms per token and per layer),
then each piece of it timed alone in µs per call and ms per token (calls per step × µs per call). Then the floor
of one call on each path (`call_floor`): a one-layer range call at one position and the whole greedy AR step,
eager, compiled (inductor's default), compiled with CUDA graphs (reduce-overhead, CUDA only) and captured (the
step replayed as one hand-captured graph: heads.runtime.CapturedStep). On a CPU there is no graph to replay: the
"captured" path there is the compiled step called directly through the same CapturedStep code.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from decode.ar import ar_decode
from decode.common import choose, positions, run_to_end
from heads import load_base
from heads.base import cache_kwarg
from heads.runtime import CapturedStep


def per_call_us(fn, calls: int, reset=None, repeats: int = 3, device=None) -> float:
    """Best of `repeats` runs of `calls` calls (µs per call); `reset` runs untimed before each run. On CUDA the
    device is synchronized before and after each run (once per `calls` calls: for the tiny model, host-bound,
    that is the host's time per call)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if reset:
            reset()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def tiny_model(folder: str, layers: int) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from heads.base import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def breakdown(base, tokens: int) -> list[tuple[str, float, float]]:
    """(piece, calls per AR step, µs per call) for one AR step at a cache of about `tokens` positions."""
    n, device = base.num_layers, base.device
    prompt = list(range(100, 120))
    whole = base.range(0, n)

    def fill():
        whole.reset()
        whole.forward(base.embed(torch.tensor([prompt])), positions(0, len(prompt), device))

    one = base.embed(torch.tensor([[7]]))
    step = lambda: whole.forward(one, positions(whole.length, 1, device))  # noqa: E731
    rows = [("run_layers (all layers, one position)", 1, per_call_us(step, tokens, fill))]
    fill()
    pos = positions(whole.length, 1, device)
    mask_kwargs = {cache_kwarg(create_causal_mask): whole.cache}
    rows.append(("  create_causal_mask (now skipped)", 1,
                 per_call_us(lambda: create_causal_mask(base.config, one, None, position_ids=pos, layer_idx=0,
                                                        **mask_kwargs), tokens)))
    rows.append(("  rotary embedding", 1, per_call_us(lambda: base.position_embeddings(one, pos), tokens)))
    rows.append(("  LayerRange.length", 1, per_call_us(lambda: whole.length, tokens)))
    rows.append(("  positions() arange", 1, per_call_us(lambda: positions(20, 1, device), tokens)))

    layer = base.layers[0]
    kv = torch.zeros(1, layer.self_attn.config.num_key_value_heads, 1, layer.self_attn.head_dim, dtype=base.dtype)
    cache = DynamicCache()
    rows.append(("  DynamicCache.update (per layer)", n,
                 per_call_us(lambda: cache.update(kv, kv, 0), tokens, lambda: cache.crop(0))))
    linear = layer.mlp.down_proj
    x = torch.randn(1, 1, linear.in_features, dtype=base.dtype)
    rows.append(("  a layer's linear (7 per layer)", 7 * n, per_call_us(lambda: linear(x), tokens * 10)))
    rows.append(("    of which F.linear, one row", 7 * n,
                 per_call_us(lambda: F.linear(x, linear.weight), tokens * 10)))
    rows.append(("embed + torch.tensor([[token]])", 1,
                 per_call_us(lambda: base.embed(torch.tensor([[7]], device=device)), tokens)))
    last = whole.forward(one, positions(whole.length, 1, device))
    rows.append(("LM head (final norm + lm_head)", 1, per_call_us(lambda: base.logits(last), tokens)))
    logits = base.logits(last)[0, -1]
    rows.append(("choose (argmax + int)", 1, per_call_us(lambda: choose(logits, 0.0, None), tokens)))
    return rows


def floor_paths(device) -> dict[str, dict]:
    """Each path a call can take: its `set_runtime` arguments and whether decode loops replay captured steps."""
    paths = {"eager": {}, "compiled": dict(compile=True, compile_mode=None, step_graphs=False)}
    if torch.device(device).type == "cuda":
        paths["reduce-overhead"] = dict(compile=True, compile_mode="reduce-overhead", step_graphs=False)
    paths["captured"] = dict(compile=True, step_graphs=True)
    return paths


def captured_call(r, hidden: torch.Tensor, position: torch.Tensor):
    """A call of layer range `r` on `hidden` at `position` (fixed buffers) through `CapturedStep`: on CUDA one replay
    of a hand-captured graph (captured at the first call per cache), on a CPU the step called directly."""
    cuda = hidden.device.type == "cuda"
    if cuda:
        r.runtime = r.runtime.for_capture()
    out = torch.empty_like(hidden)
    step = CapturedStep(lambda: out.copy_(r.forward(hidden, position)), name=f"layers [{r.start}, {r.end})",
                        graphs="cuda" if cuda else None)
    step.ranges = [r]
    return lambda: step(r.cache)


def one_layer_call(base, captured: bool):
    """A one-position call of layers [0, 1) at the next position, as a callable, and its reset (an emptied cache
    and a prompt prefilled). Captured: from fixed buffers through `CapturedStep` (one replay per call on CUDA)."""
    device = base.device
    r = base.range(0, 1)
    x = base.embed(torch.tensor([[7]], device=device))
    prompt = base.embed(torch.tensor([list(range(100, 120))], device=device))

    def reset():
        r.reset()
        r.forward(prompt, positions(0, prompt.shape[1], device))

    if not captured:
        return (lambda: r.forward(x, positions(r.length, 1, device))), reset
    position = torch.zeros(1, 1, dtype=torch.long, device=device)
    replay = captured_call(r, x, position)

    def call():
        position.fill_(r.length)
        replay()

    return call, reset


def call_floor(folder: str, device="cpu", calls: int = 100, tokens: int = 32) -> dict:
    """µs per one-layer range call (one position, 20 + up to `calls` cached) and ms per greedy AR step (the whole
    model), per path (floor_paths). The first run of each compiles and captures (untimed)."""
    out = {}
    for name, settings in floor_paths(device).items():
        base = load_base(folder, device=device)
        settings = dict(settings)
        step_graphs = settings.pop("step_graphs", False)
        base.set_runtime(**settings)
        base.runtime.step_graphs = step_graphs
        with torch.inference_mode():
            call, reset = one_layer_call(base, captured=step_graphs)
            reset()
            call()  # compile and capture
            call_us = per_call_us(call, calls, reset, device=device)
            run_to_end(ar_decode(base, list(range(100, 120)), 8))
            step_ms = min(run_to_end(ar_decode(base, list(range(100, 120)), tokens)).stats["token_s"]
                          for _ in range(3)) * 1e3
        out[name] = {"layer_call_us": round(call_us, 1), "ar_step_ms": round(step_ms, 3),
                     "capture_s": round(base.runtime.capture_s, 1)}
    out["captured_path"] = "CUDA graph replay" if torch.device(device).type == "cuda" else \
        "the compiled step called directly (a CPU has no graphs to replay)"
    return out


def print_floor(floor: dict, layers: int) -> None:
    print(f"\nper-call floor ({layers}-layer tiny Llama; captured = {floor['captured_path']}):")
    eager = floor["eager"]
    for name, row in floor.items():
        if isinstance(row, dict):
            call, step = row["layer_call_us"], row["ar_step_ms"]
            print(f"  {name:16s} one-layer call {call:8.1f} µs ({eager['layer_call_us'] / call:5.2f}x eager)   "
                  f"AR step {step:7.3f} ms ({eager['ar_step_ms'] / step:5.2f}x eager)   capture {row['capture_s']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="an HF folder (default: a tiny random Llama of --layers)")
    parser.add_argument("--device", default="cpu", help="where the floor is measured (the breakdown: CPU only)")
    parser.add_argument("--floor-only", action="store_true", help="only the per-call floor of each path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    folder = args.model or tiny_model(tempfile.mkdtemp(prefix="ppsd-overhead-"), args.layers)
    print_floor(call_floor(folder, args.device, tokens=args.tokens), args.layers)
    if args.floor_only:
        return
    for dtype in ("float32", "bfloat16"):
        for on in (False, True):
            base = load_base(folder, dtype=dtype, batch_invariant=on)
            with torch.inference_mode():
                run_to_end(ar_decode(base, list(range(100, 120)), 8))  # warm-up
                step = min(run_to_end(ar_decode(base, list(range(100, 120)), args.tokens)).stats["token_s"]
                           for _ in range(3))
                rows = breakdown(base, args.tokens)
            print(f"\n{dtype} batch_invariant={on}: AR {step * 1e3:.2f} ms/token, "
                  f"{step * 1e3 / base.num_layers:.3f} ms per layer per token")
            for name, calls, us in rows:
                print(f"  {name:42s} {calls:4d} x {us:8.1f} µs = {calls * us / 1e3:6.2f} ms/token")


if __name__ == "__main__":
    main()
