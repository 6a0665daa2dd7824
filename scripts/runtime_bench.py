"""The decode runtime against its bounds and against Hugging Face `generate`, each ratio measured in one run.

    python -m scripts.runtime_bench [--device cpu|cuda] [--threads 1] [--tokens 64] [--layers 30] [--model smollm2] [--head HEAD]

1. Host overhead per layer per token: a tiny random Llama (compute ≈ 0) at the base's depth and at 2 layers;
   (t_depth - t_2) / (depth - 2) leaves out the embedding, LM head and token choice. Eager vs compiled static.
2. The base (SmolLM2 by default) AR ms/token: eager, compiled static, HF `generate` (greedy, same weights, dtype and threads), and the
   memory-bandwidth bound for its weights (their bytes / a timed copy's bandwidth).
3. With --head: EESD with the trained head vs HF's `assistant_early_exit` at the same layer.
4. With --gen-rows B: teacher generation (training data) tokens/s at batch B, eager vs compiled, on the
   project's own prompts (greedy, 128 new tokens).
5. One Llama-7B-shaped decoder layer (random bf16 weights, 256 cached positions): a step of 1 and of 8 positions,
   eager vs compiled, against its weights' bytes at the copy bandwidth (--layer-7b; meant for a GPU).
Compiling is paid once per process and printed (capture_s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch

from decode.ar import ar_decode
from decode.common import run_to_end
from decode.eesd import eesd_decode
from heads import load_base, load_head
from heads.files import read_prompts
from scripts.overhead import tiny_model

PROMPT = list(range(100, 120))


def unique_bytes(parameters) -> int:
    """Bytes a step reads from these weights, a tied embedding / LM head counted once."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in parameters}.values())


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ar_ms(base, tokens: int, repeats: int = 3) -> float:
    """Mean AR decode step (prefill excluded), best of `repeats`, after a warm-up that captures the graphs."""
    with torch.inference_mode():
        run_to_end(ar_decode(base, PROMPT, 8))
        return min(run_to_end(ar_decode(base, PROMPT, tokens)).stats["token_s"] for _ in range(repeats)) * 1e3


def eesd_ms(base, head, tokens: int, repeats: int = 3) -> float:
    """EESD wall time per token after the first (prefill excluded), best of `repeats`."""
    with torch.inference_mode():
        run_to_end(eesd_decode(base, head, PROMPT, 8))
        gens = [run_to_end(eesd_decode(base, head, PROMPT, tokens)) for _ in range(repeats)]
    return min((g.wall_time - g.stats["prefill_s"]) / (len(g.tokens) - 1) for g in gens) * 1e3


def hf_generate_ms(model, prompt: list[int], tokens: int, repeats: int = 3, **kwargs) -> float:
    """HF generate's ms per token after the first: (t(tokens) - t(1)) / (tokens - 1), greedy, forced length."""
    ids = torch.tensor([prompt], device=model.device)

    def timed(n):
        sync(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
        sync(model.device)
        return time.perf_counter() - start

    timed(4)
    return min((timed(tokens) - timed(1)) / (tokens - 1) for _ in range(repeats)) * 1e3


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), the bound a decode step streams at."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def layer_7b(device, repeats: int = 50, hidden: int = 4096, intermediate: int = 11008, heads: int = 32) -> dict:
    """One Llama-7B-shaped layer on 256 cached positions: ms per step of 1 and 8 positions, eager vs compiled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from heads.base import Base

    config = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=heads)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    base = Base(model, tokenizer=None, name="llama-7b-layer", folder=None, loaded_layers=range(1))
    weight_bytes = unique_bytes(model.model.layers.parameters())
    out = {"bound_ms": round(weight_bytes / copy_bandwidth(device) * 1e3, 4)}
    for mode in ("eager", "compiled"):
        base.set_runtime(compile=mode == "compiled")
        for count in (1, 8):
            r = base.range(0, 1)
            with torch.inference_mode():
                r.forward(torch.randn(1, 256, hidden, device=device, dtype=torch.bfloat16),
                          torch.arange(256, device=device)[None])
                x = torch.randn(1, count, hidden, device=device, dtype=torch.bfloat16)
                pos = torch.arange(256, 256 + count, device=device)[None]
                times = []
                for _ in range(repeats):
                    sync(device)
                    start = time.perf_counter()
                    r.forward(x, pos)
                    sync(device)
                    times.append(time.perf_counter() - start)
                    r.crop(256)
            out[f"{mode}_{count}_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 4)
    return out


def host_overhead(depth: int, tokens: int, device) -> dict:
    rows = {}
    for mode in ("eager", "compiled"):
        ms = {}
        for layers in (2, depth):
            base = load_base(tiny_model(tempfile.mkdtemp(prefix="ppsd-runtime-"), layers), device=device)
            base.set_runtime(compile=mode == "compiled")
            ms[layers] = ar_ms(base, tokens)
            capture = base.runtime.capture_s
        rows[mode] = {"ms_per_token": round(ms[depth], 3), "ms_per_layer": round((ms[depth] - ms[2]) / (depth - 2), 4),
                      "capture_s": round(capture, 1)}
    base = load_base(tiny_model(tempfile.mkdtemp(prefix="ppsd-runtime-"), depth), device=device)
    rows["hf_generate"] = {"ms_per_token": round(hf_generate_ms(base.model, PROMPT, tokens), 3)}
    return rows


def base_figures(model: str, tokens: int, dtype: str, head_path: str | None, device) -> dict:
    base = load_base(model, dtype=dtype, device=device)
    weight_bytes = unique_bytes(base.model.parameters())
    out = {"model": base.name, "dtype": dtype, "weights_mb": round(weight_bytes / 1e6, 1),
           "bandwidth_gb_s": round(copy_bandwidth(device) / 1e9, 1)}
    out["bound_ms"] = round(weight_bytes / (out["bandwidth_gb_s"] * 1e9) * 1e3, 3)
    out["hf_generate_ms"] = round(hf_generate_ms(base.model, PROMPT, tokens), 2)
    head = load_head(head_path, base) if head_path else None
    if head is not None:
        out["hf_early_exit_ms"] = round(hf_generate_ms(base.model, PROMPT, tokens,
                                                       assistant_early_exit=head.exit_layer), 2)
    for mode in ("eager", "compiled"):
        base.set_runtime(compile=mode == "compiled")
        out[f"ar_{mode}_ms"] = round(ar_ms(base, tokens), 2)
        if head is not None:
            out[f"eesd_{mode}_ms"] = round(eesd_ms(base, head, tokens), 2)
    out["capture_s"] = round(base.runtime.capture_s, 1)
    return out


def generation(model: str, rows: int, dtype: str, device, max_new_tokens: int = 128) -> dict:
    from train.data import DEFAULT_PROMPTS, generate_batch, generate_batch_static

    base = load_base(model, dtype=dtype, device=device)
    prompts = [base.encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in read_prompts(DEFAULT_PROMPTS)]
    batch = sorted(prompts, key=len)[:rows]
    out = {"rows": rows, "max_new_tokens": max_new_tokens}
    for mode, generate in (("eager", generate_batch), ("compiled", generate_batch_static)):
        base.set_runtime(compile=mode == "compiled")
        for _ in range(2 if mode == "compiled" else 1):  # the compiled path's first run captures; time the second
            sync(device)
            start = time.perf_counter()
            answers = generate(base, batch, max_new_tokens=max_new_tokens, sample=False, temperature=1.0,
                               top_p=1.0, seed=0)
            sync(device)
            seconds = time.perf_counter() - start
        out[f"{mode}_tokens_per_s"] = round(sum(map(len, answers)) / seconds, 1)
    return out


def run(*, model: str = "smollm2", device: str = "cpu", dtype: str = "float32", threads: int = 1, tokens: int = 64,
        layers: int = 30, head_path: str | None = None, base_model: bool = True, gen_rows: int = 0,
        layer_7b_figures: bool = False) -> dict:
    """Every figure above that is asked for, printed as it is measured; returns them as a dict."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    result = {"mode": "runtime", "device": device, "dtype": dtype, "threads": threads, "tokens": tokens,
              "host_overhead": host_overhead(layers, tokens, device)}
    h = result["host_overhead"]
    print(f"host overhead per layer per token ({layers}-layer tiny Llama, {threads} thread(s)): "
          f"eager {h['eager']['ms_per_layer']:.3f} ms, compiled {h['compiled']['ms_per_layer']:.3f} ms "
          f"(capture {h['compiled']['capture_s']} s); AR step eager {h['eager']['ms_per_token']:.2f} ms, compiled "
          f"{h['compiled']['ms_per_token']:.2f} ms, HF generate {h['hf_generate']['ms_per_token']:.2f} ms", flush=True)
    if base_model:
        s = result["base"] = base_figures(model, tokens, dtype, head_path, device)
        print(f"{s['model']} {s['dtype']} AR ms/token: eager {s['ar_eager_ms']}, compiled {s['ar_compiled_ms']} "
              f"(capture {s['capture_s']} s), HF generate {s['hf_generate_ms']}; bound {s['bound_ms']} ms "
              f"({s['weights_mb']} MB at {s['bandwidth_gb_s']} GB/s). compiled vs HF generate: "
              f"{s['hf_generate_ms'] / s['ar_compiled_ms']:.2f}x, vs eager {s['ar_eager_ms'] / s['ar_compiled_ms']:.2f}x",
              flush=True)
        if "eesd_eager_ms" in s:
            print(f"EESD at the head's layer, ms/token: ours eager {s['eesd_eager_ms']}, compiled {s['eesd_compiled_ms']};"
                  f" HF assistant_early_exit {s['hf_early_exit_ms']} ({s['hf_early_exit_ms'] / s['eesd_compiled_ms']:.2f}x"
                  f" slower than ours compiled)", flush=True)
    if gen_rows:
        g = result["generation"] = generation(model, gen_rows, dtype, device)
        print(f"teacher generation, batch {g['rows']}: eager {g['eager_tokens_per_s']} tokens/s, compiled "
              f"{g['compiled_tokens_per_s']} tokens/s", flush=True)
    if layer_7b_figures:
        L = result["layer_7b"] = layer_7b(device)
        print(f"7B-shaped layer, bf16, 256 cached: 1 position eager {L['eager_1_ms']} ms, compiled {L['compiled_1_ms']} ms;"
              f" 8 positions eager {L['eager_8_ms']} ms, compiled {L['compiled_8_ms']} ms; bound {L['bound_ms']} ms",
              flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--head", default=None, help="a trained head folder: adds EESD vs HF assistant_early_exit")
    parser.add_argument("--model", default="smollm2", help="the base for the figures of a real model")
    parser.add_argument("--skip-model", action="store_true", help="only the tiny-model overhead figures")
    parser.add_argument("--gen-rows", type=int, default=0, help="also time teacher generation at this batch size")
    parser.add_argument("--layer-7b", action="store_true", help="also time one 7B-shaped layer (bf16; for a GPU)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    result = run(model=args.model, device=args.device, dtype=args.dtype, threads=args.threads, tokens=args.tokens,
                 layers=args.layers, head_path=args.head, base_model=not args.skip_model, gen_rows=args.gen_rows,
                 layer_7b_figures=args.layer_7b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
