"""The decode runtime against its bounds and against Hugging Face `generate`, each ratio measured in one run.

    python -m scripts.runtime_bench [--device cpu|cuda] [--threads 1] [--tokens 64] [--layers 30] [--model smollm2] [--head HEAD]
    python -m scripts.runtime_bench --device cuda --model 7b --skip-overhead [--gamma 4] [--shards 1,2,4,8 --allreduce-ms 0.015]
    python -m scripts.runtime_bench --model 7b --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 4 \
        --head-dim 64 --vocab 512 --skip-overhead --shards 1,2     # the same code on a CPU, small

1. Host overhead per layer per token: a tiny random Llama (compute ≈ 0) at the base's depth and at 2 layers;
   (t_depth - t_2) / (depth - 2) leaves out the embedding, LM head and token choice. Eager vs compiled static.
   Then the floor of one call per path (`call_floor`, scripts/overhead.py): a one-layer range call and the whole
   AR step, eager, compiled, reduce-overhead (CUDA) and captured (one hand-captured graph replayed per step; on
   a CPU, the compiled step called directly).
2. The base (SmolLM2 by default) AR ms/token: eager, compiled static (`compiled`: the layer range's compiled step
   per token, CUDA graphs through torch's graph trees on a GPU), captured (the whole step one hand-captured graph,
   `captured`), HF `generate` (greedy, same weights, dtype and threads), and the memory-bandwidth bound for its
   weights (their bytes / a timed copy's bandwidth).
3. With --head: EESD with the trained head vs HF's `assistant_early_exit` at the same layer.
4. With --gen-rows B: teacher generation (training data) tokens/s at batch B, eager vs compiled, on the
   project's own prompts (greedy, 128 new tokens).
5. One Llama-7B-shaped decoder layer (random bf16 weights, 256 cached positions): a step of 1 and of 8 positions,
   eager vs compiled vs captured, against its weights' bytes at the copy bandwidth (--layer-7b; meant for a GPU).
6. --model 7b: a whole Llama-7B-shaped model (32 layers, random bf16 weights made on the device, no download),
   compiled: the AR step captured by hand (`ar_captured_ms`, its capture `captured_capture_s`) and through the
   compiled layer range (`ar_ms`), a γ + 1-position verify step, the capture time and the bound (its weights' bytes at
   --bandwidth-gb-s, or at a measured copy's bandwidth). Any shape size can be overridden (--hidden ...).
7. --shards 1,2,4,8: tensor-parallel AR's per-layer cost, measured on one device: one compiled 7B-shaped layer
   with its heads and MLP split S ways (`shard_ms`; `shard_captured_ms`: the same call replayed as one
   hand-captured graph), plus two all-reduces per layer at --allreduce-ms (stated, not measured).
8. --teacher-prompts N: teacher generation as training runs it (default prompts, compiled, continuous batch):
   greedy and sampled tokens/s, capture included.
Compiling is paid once per process and printed (capture_s). The last line is the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import fields, replace

import torch

from decode.common import run_to_end
from decode.eesd import eesd_decode
from heads import UserError, load_base, load_head
from heads.files import read_prompts
from scripts.llama7b import (PROMPT, Shape, ar_ms, copy_bandwidth, layer_7b, model_7b, sync, tp_shards,
                             unique_bytes)
from scripts.overhead import call_floor, tiny_model


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
    before = base.runtime.capture_s
    out["ar_captured_ms"] = round(ar_ms(base, tokens, captured=True), 2)
    out["captured_capture_s"] = round(base.runtime.capture_s - before, 1)
    out["captured_over_bound"] = round(out["ar_captured_ms"] / out["bound_ms"], 2)
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


def teacher(model: str, device, dtype: str, prompts: int = 0, max_new_tokens: int = 160,
            batch_size: int | str = "auto") -> dict:
    """Teacher generation as `python -m train` runs it on this device: the default prompt set (its first
    `prompts`; 0 = all), the compiled runtime, the greedy pass then one sampled pass, each timed end to end
    with its capture, in tokens/s of answers."""
    from types import SimpleNamespace

    from train.data import generate_responses, generation_batch_size, load_prompts

    base = load_base(model, dtype=dtype, device=device)
    base.set_runtime(compile=True)
    rows = load_prompts("default", limit=prompts or None)
    settings = SimpleNamespace(gen_batch_size=batch_size, max_prompt_tokens=1024, max_new_tokens=max_new_tokens)
    gen = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": 1024, "temperature": 0.8, "top_p": 0.95,
           "batch_size": generation_batch_size(base, settings), "seed": 0}
    out = {"model": base.name, "prompts": len(rows), "batch_size": gen["batch_size"], "runtime": base.runtime.describe()}
    for name, sample in (("greedy", None), ("sampled", 0)):
        sync(device)
        start = time.perf_counter()
        answers = generate_responses(base, rows, gen, sample=sample, progress=False)
        sync(device)
        seconds = time.perf_counter() - start
        tokens = sum(len(a["response_ids"]) for a in answers)
        out[name] = {"answers": len(answers), "tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1)}
    out["capture_s"] = round(base.runtime.capture_s, 1)
    out["shapes_captured"] = len(base.runtime.captured)
    return out


def run(*, model: str = "smollm2", device: str = "cpu", dtype: str = "float32", threads: int = 1, tokens: int = 64,
        layers: int | None = None, head_path: str | None = None, base_model: bool = True, gen_rows: int = 0,
        layer_7b_figures: bool = False, overhead: bool = True, shape: Shape | None = None, gamma: int = 4,
        bandwidth_gb_s: float | None = None, shards: tuple[int, ...] = (), allreduce_ms: float | None = None,
        repeats: int = 20, teacher_prompts: int | None = None, teacher_new_tokens: int = 160) -> dict:
    """Every figure above that is asked for, printed as it is measured; returns them as a dict. model="7b": the
    whole 7B-shaped model (`shape`, its depth `layers`) instead of a real base."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    result = {"mode": "runtime", "device": device, "dtype": dtype, "threads": threads, "tokens": tokens}
    shape = shape or Shape()
    if model == "7b" and layers:
        shape = replace(shape, layers=layers)
    if overhead:
        result |= _overhead_figures(layers or 30, tokens, device, threads)
    if base_model:
        result |= _model_figures(model, device, dtype, shape, tokens, gamma, repeats, bandwidth_gb_s, head_path)
    if gen_rows:
        g = result["generation"] = generation(model, gen_rows, dtype, device)
        print(f"teacher generation, batch {g['rows']}: eager {g['eager_tokens_per_s']} tokens/s, compiled "
              f"{g['compiled_tokens_per_s']} tokens/s", flush=True)
    if teacher_prompts is not None:
        T = result["teacher"] = teacher(model, device, dtype, teacher_prompts, teacher_new_tokens)
        print(f"teacher generation ({T['prompts']} prompts, rows of at most {T['batch_size']}, capture included): greedy "
              f"{T['greedy']['tokens_per_s']} tokens/s ({T['greedy']['seconds']} s), sampled "
              f"{T['sampled']['tokens_per_s']} tokens/s ({T['sampled']['seconds']} s); {T['shapes_captured']} "
              f"shape(s) captured in {T['capture_s']} s", flush=True)
    if layer_7b_figures:
        L = result["layer_7b"] = layer_7b(device, shape=shape)
        print(f"7B-shaped layer, bf16, 256 cached: 1 position eager {L['eager_1_ms']} ms, compiled {L['compiled_1_ms']} ms,"
              f" captured {L['captured_1_ms']} ms; 8 positions eager {L['eager_8_ms']} ms, compiled {L['compiled_8_ms']} ms,"
              f" captured {L['captured_8_ms']} ms; bound {L['bound_ms']} ms",
              flush=True)
    if shards:
        t = result["tp_shards"] = tp_shards(device, shards, repeats=repeats, shape=shape, allreduce_ms=allreduce_ms)
        print("tensor-parallel shard of one 7B-shaped layer, compiled, 1 position: "
              + ", ".join(f"S={k} {v} ms" for k, v in t["shard_ms"].items()) + "; captured: "
              + ", ".join(f"S={k} {v} ms" for k, v in t["shard_captured_ms"].items())
              + (f"; + 2 all-reduces of {allreduce_ms} ms each (assumed)" if allreduce_ms is not None else ""), flush=True)
    return result


def _overhead_figures(depth: int, tokens: int, device: str, threads: int) -> dict:
    """The host overhead per layer and the per-call floor, on a `depth`-layer tiny Llama."""
    h = host_overhead(depth, tokens, device)
    print(f"host overhead per layer per token ({depth}-layer tiny Llama, {threads} thread(s)): "
          f"eager {h['eager']['ms_per_layer']:.3f} ms, compiled {h['compiled']['ms_per_layer']:.3f} ms "
          f"(capture {h['compiled']['capture_s']} s); AR step eager {h['eager']['ms_per_token']:.2f} ms, compiled "
          f"{h['compiled']['ms_per_token']:.2f} ms, HF generate {h['hf_generate']['ms_per_token']:.2f} ms", flush=True)
    f = call_floor(tiny_model(tempfile.mkdtemp(prefix="ppsd-runtime-"), depth), device, tokens=tokens)
    print(f"per-call floor ({depth}-layer tiny Llama; captured = {f['captured_path']}): one-layer call "
          + ", ".join(f"{k} {v['layer_call_us']} µs" for k, v in f.items() if isinstance(v, dict))
          + "; AR step " + ", ".join(f"{k} {v['ar_step_ms']} ms" for k, v in f.items() if isinstance(v, dict)),
          flush=True)
    return {"host_overhead": h, "call_floor": f}


def _model_figures(model: str, device: str, dtype: str, shape: Shape, tokens: int, gamma: int, repeats: int,
                   bandwidth_gb_s: float | None, head_path: str | None) -> dict:
    """The whole model's figures: the 7B-shaped one (model="7b"), or a real base with its head."""
    if model == "7b":
        m = model_7b(device, shape, tokens=tokens, gamma=gamma, repeats=repeats, bandwidth_gb_s=bandwidth_gb_s)
        print(f"7B-shaped model ({shape.layers} layers, {m['weights_gb']} GB bf16, set up in {m['setup_s']} s), compiled:"
              f" AR step {m['ar_ms']} ms, verify of {gamma + 1} positions {m[f'verify_{gamma + 1}_ms']} ms, capture "
              f"{m['capture_s']} s; bound {m['bound_ms']} ms at {m['bandwidth_gb_s']} GB/s ({m['bandwidth_source']}): "
              f"AR at {m['ar_over_bound']}x the bound; captured AR step {m['ar_captured_ms']} ms "
              f"({m['captured_over_bound']}x the bound, capture {m['captured_capture_s']} s)", flush=True)
        return {"model_7b": m}
    s = base_figures(model, tokens, dtype, head_path, device)
    print(f"{s['model']} {s['dtype']} AR ms/token: eager {s['ar_eager_ms']}, compiled {s['ar_compiled_ms']} "
          f"(capture {s['capture_s']} s), HF generate {s['hf_generate_ms']}; bound {s['bound_ms']} ms "
          f"({s['weights_mb']} MB at {s['bandwidth_gb_s']} GB/s). compiled vs HF generate: "
          f"{s['hf_generate_ms'] / s['ar_compiled_ms']:.2f}x, vs eager {s['ar_eager_ms'] / s['ar_compiled_ms']:.2f}x; "
          f"captured {s['ar_captured_ms']} ({s['captured_over_bound']}x the bound, capture {s['captured_capture_s']} s)",
          flush=True)
    if "eesd_eager_ms" in s:
        print(f"EESD at the head's layer, ms/token: ours eager {s['eesd_eager_ms']}, compiled {s['eesd_compiled_ms']};"
              f" HF assistant_early_exit {s['hf_early_exit_ms']} ({s['hf_early_exit_ms'] / s['eesd_compiled_ms']:.2f}x"
              f" slower than ours compiled)", flush=True)
    return {"base": s}


def parse_shards(text: str) -> tuple[int, ...]:
    try:
        shards = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--shards {text!r}: give shard counts such as 1,2,4,8") from None
    if any(s < 1 for s in shards):
        raise UserError(f"--shards {text!r}: every shard count must be >= 1")
    return shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None,
                        help="depth of the tiny overhead model (default 30) and of --model 7b (default 32)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--head", default=None, help="a trained head folder: adds EESD vs HF assistant_early_exit")
    parser.add_argument("--model", default="smollm2", help="the base for the figures of a real model; 7b: a "
                        "Llama-7B-shaped model with random bf16 weights (no download)")
    parser.add_argument("--skip-model", action="store_true", help="only the tiny-model overhead figures")
    parser.add_argument("--skip-overhead", action="store_true", help="leave out the tiny-model overhead figures")
    parser.add_argument("--gen-rows", type=int, default=0, help="also time teacher generation at this batch size")
    parser.add_argument("--teacher-prompts", type=int, default=None,
                        help="also time teacher generation (greedy + sampled, compiled) on this many default "
                             "prompts (0: all)")
    parser.add_argument("--teacher-new-tokens", type=int, default=160, help="answer length for --teacher-prompts")
    parser.add_argument("--layer-7b", action="store_true", help="also time one 7B-shaped layer (bf16; for a GPU)")
    parser.add_argument("--shards", default="", help="also time one 7B-shaped layer split S ways, e.g. 1,2,4,8")
    parser.add_argument("--allreduce-ms", type=float, default=None,
                        help="the all-reduce cost to add per tensor-parallel layer (twice), stated, not measured")
    parser.add_argument("--gamma", type=int, default=4, help="--model 7b: the verify step covers gamma + 1 positions")
    parser.add_argument("--bandwidth-gb-s", type=float, default=None,
                        help="--model 7b: the bound's bandwidth (default: a copy measured on the device)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (the median is kept)")
    for size in fields(Shape):
        if size.name != "layers":
            parser.add_argument(f"--{size.name.replace('_', '-')}", type=int, default=None,
                                help=f"--model 7b / --shards: the shape's {size.name} (default {size.default})")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = {f.name: getattr(args, f.name) for f in fields(Shape) if f.name != "layers" and getattr(args, f.name) is not None}
    if any(v < 1 for v in sizes.values()) or (args.layers is not None and args.layers < 1) or not 0 < args.gamma < 16:
        parser.error("shape sizes and --layers must be >= 1, --gamma in 1..15")
    try:
        result = run(model=args.model, device=args.device, dtype=args.dtype, threads=args.threads, tokens=args.tokens,
                     layers=args.layers, head_path=args.head, base_model=not args.skip_model, gen_rows=args.gen_rows,
                     layer_7b_figures=args.layer_7b, overhead=not args.skip_overhead, shape=replace(Shape(), **sizes),
                     gamma=args.gamma, bandwidth_gb_s=args.bandwidth_gb_s, shards=parse_shards(args.shards),
                     allreduce_ms=args.allreduce_ms, repeats=args.repeats, teacher_prompts=args.teacher_prompts,
                     teacher_new_tokens=args.teacher_new_tokens)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
