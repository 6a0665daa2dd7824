"""Spec-Bench-format evaluation: questions in, answers + per-category summaries out.

Input: JSONL with question_id, category, turns (user messages; the model's own answer is fed back
between turns through the chat template). Output: Spec-Bench's answer format (choices[0].turns,
new_tokens, wall_time and decoding_steps per turn, accept_lengths one flat list per question) for every
method, and a summary: tokens/s, acceptance rate, mean accepted length, speedup vs ar (same invocation),
the speedup Spec-Bench's evaluation/speed.py would print for these files, the prediction of
decode/theory.py from the measured acceptance and stage costs, and the fastest method (the figures and
the prediction come from decode/measure.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from decode.common import Generation
from decode.measure import ar_token_s, figures, predict
from heads.errors import UserError
from heads.files import read_prompts, run_folder, staged_files

MIN_FREE_BYTES = 1 << 20  # answer files are small: a folder with less free is all but full


def answer(decoder, question: dict, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, seed: int = 0, on_text=None) -> tuple[dict, list[Generation]]:
    """Every turn of one question, the model's answers fed back; returns (Spec-Bench choice, generations)."""
    base = decoder.base
    messages, generations = [], []
    choice = {"index": 0, "turns": [], "decoding_steps": [], "new_tokens": [], "wall_time": [], "accept_lengths": []}
    for turn in question["turns"]:
        messages.append({"role": "user", "content": turn})
        prompt_ids = base.encode_chat(messages)
        shown, streamed = "", []
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        for token in (decoder.stream(prompt_ids, max_new_tokens, **sampling) if on_text else ()):
            streamed.append(token)
            text = base.tokenizer.decode(streamed, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text[len(shown):])
                shown = text
        gen = decoder.last_generation if on_text else decoder.generate(prompt_ids, max_new_tokens, **sampling)
        text = base.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        if on_text:
            on_text(text[len(shown):] + "\n")
        messages.append({"role": "assistant", "content": text})
        generations.append(gen)
        choice["turns"].append(text)
        choice["decoding_steps"].append(len(gen.accept_lengths))
        choice["new_tokens"].append(gen.new_tokens)
        choice["wall_time"].append(gen.wall_time)
        # one flat list per question, as Spec-Bench's own writers keep it: speed.py extends a list with it
        # and takes np.mean, which fails on (ragged) per-turn lists
        choice["accept_lengths"].extend(gen.accept_lengths)
    return choice, generations


def longest_context(base, questions: list[dict], max_new_tokens: int) -> int:
    """At most how many positions a question's chat reaches: its turns as one chat plus an answer of
    `max_new_tokens` (and the template's few tokens) per turn. A static cache sized for it before the timed
    questions never grows, and so never captures new graphs, while they run."""
    return max(len(base.encode_chat([{"role": "user", "content": t} for t in q["turns"]]))
               + len(q["turns"]) * (max_new_tokens + 16) for q in questions)


def answer_record(question: dict, choice: dict, model_id: str, method: str) -> dict:
    return {"question_id": question["question_id"], "category": question["category"], "answer_id": uuid.uuid4().hex,
            "model_id": f"{model_id}-{method}", "choices": [choice], "tstamp": time.time()}


# ---- Spec-Bench's evaluation/speed.py, on our answer records ------------------------------------

def speed_py_token_count(tokenizer):
    """How speed.py counts the tokens of a baseline turn: it re-tokenizes the answer text and subtracts 1
    for the BOS a Llama/Vicuna tokenizer prepends. With a tokenizer that adds no BOS (SmolLM2's) that is one
    short per turn, and re-tokenized text need not give back the generated count (dropped stop tokens,
    non-canonical splits); kept as is so `spec_bench_speedup` is the number speed.py prints."""
    return lambda text: len(tokenizer(text).input_ids) - 1


def spec_bench_speedup(records: list[dict], baseline: list[dict], count_tokens) -> float | None:
    """speed.py's "Speedup ratio": the mean over questions of sum(new_tokens) / sum(wall_time), divided by
    the same mean over the baseline's questions, whose tokens are recounted from its answer text. A mean of
    per-question speeds, so it differs from speedup_vs_ar (all tokens / all time) when questions differ."""
    def mean_speed(recs, tokens_of) -> float | None:
        speeds = [tokens_of(r["choices"][0]) / sum(r["choices"][0]["wall_time"]) for r in recs]
        return sum(speeds) / len(speeds) if speeds else None

    mine = mean_speed(records, lambda c: sum(c["new_tokens"]))
    base = mean_speed(baseline, lambda c: sum(count_tokens(t) for t in c["turns"]))
    return mine / base if mine is not None and base else None


# ---- summaries ----------------------------------------------------------------------------------

def summarize(gens_by_method: dict[str, list[Generation]], cats_by_method: dict[str, list[str]],
              gamma: int, records_by_method: dict[str, list[dict]] | None = None, count_tokens=None) -> dict:
    """Figures for every method (overall and per category), speedups vs ar, predictions, the fastest;
    with the answer records and speed.py's token count, also speed.py's speedup vs the ar file (for ar
    itself it is not 1: speed.py recounts only the baseline's tokens)."""
    records_by_method = records_by_method or {}

    def spec_bench(name: str, category: str | None = None) -> float | None:
        if count_tokens is None or "ar" not in records_by_method or name not in records_by_method:
            return None
        pick = lambda recs: [r for r in recs if category in (None, r["category"])]  # noqa: E731
        return spec_bench_speedup(pick(records_by_method[name]), pick(records_by_method["ar"]), count_tokens)

    ar = gens_by_method.get("ar")
    ar_figs = figures(ar) if ar else None
    t_ar = ar_token_s(ar) if ar else None
    result = {}
    for name, gens in gens_by_method.items():
        figs = figures(gens)
        figs["speedup_vs_ar"] = figs["tokens_per_s"] / ar_figs["tokens_per_s"] if ar_figs else None
        ar_decode_tps = ar_figs["decode_tokens_per_s"] if ar_figs else None
        figs["decode_speedup_vs_ar"] = (figs["decode_tokens_per_s"] / ar_decode_tps
                                        if ar_decode_tps and figs["decode_tokens_per_s"] else None)
        figs["spec_bench_speedup"] = spec_bench(name)
        pred = predict(name, gens, t_ar, gamma, figs["acceptance_rate"])
        figs.update(pred)
        p = pred.get("predicted_speedup")
        measured = figs["decode_speedup_vs_ar"] or figs["speedup_vs_ar"]  # the prediction leaves prefill out
        figs["measured_over_predicted"] = measured / p if p and measured else None
        by_cat: dict[str, list] = defaultdict(list)
        for g, c in zip(gens, cats_by_method[name]):
            by_cat[c].append(g)
        ar_by_cat: dict[str, list] = defaultdict(list)
        if ar:
            for g, c in zip(ar, cats_by_method["ar"]):
                ar_by_cat[c].append(g)
        figs["categories"] = {}
        for c, cg in by_cat.items():
            f = figures(cg)
            ar_tps = figures(ar_by_cat[c])["tokens_per_s"] if ar_by_cat.get(c) else None
            f["speedup_vs_ar"] = f["tokens_per_s"] / ar_tps if ar_tps else None
            f["spec_bench_speedup"] = spec_bench(name, c)
            figs["categories"][c] = {k: f[k] for k in ("tokens_per_s", "acceptance_rate", "mean_accepted_length",
                                                        "speedup_vs_ar", "spec_bench_speedup", "new_tokens")}
        result[name] = figs
    fastest = max(result, key=lambda n: result[n]["tokens_per_s"])
    # one AR step as timed inside the loop (embedding, layers, LM head, the token read): the loop's ms/token
    # without prefill against it is the loop's own per-token cost
    return {"figures": result, "fastest_method": fastest, "ar_step_ms": t_ar * 1e3 if t_ar else None}


def round_floats(obj, digits: int = 5):
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    return obj


# ---- the whole evaluation (python -m decode) ----------------------------------------------------

def methods_of(cfg) -> list[str]:
    """`cfg.method` and `cfg.compare`, ar (the baseline) first."""
    methods = [cfg.method] + [m for m in (cfg.compare or []) if m != cfg.method]
    return ["ar"] + [m for m in methods if m != "ar"]


def spec_options(cfg) -> dict:
    """resolve_spec's options from a checked decode config (heads.schema.DecodeConfig)."""
    return dict(methods=methods_of(cfg), head_path=cfg.head_path, model=cfg.model, device=cfg.device,
                dtype=cfg.dtype, compile=cfg.compile, batch_invariant=cfg.batch_invariant, threads=cfg.threads,
                stage_threads=cfg.stage_threads, stages=cfg.stages, stage_layers=cfg.stage_layers, gamma=cfg.gamma,
                window=cfg.window, placement=cfg.placement, timeout_s=cfg.timeout_s)


def run(cfg, out_dir: Path, print_text=None) -> dict:
    """Run `cfg.method` and every method in `cfg.compare` (ar always: the baseline) on the same
    questions, interleaved per question so machine noise hits every method alike; write answers and
    the summary into out_dir; return the summary (the JSON line the entry point prints).

    `cfg`: the checked options (heads.schema.DecodeConfig, what `validate` returns)."""
    if cfg.prompt is not None:
        questions = [{"question_id": 0, "category": "prompt", "turns": [str(cfg.prompt)]}]
    else:
        questions = read_prompts(cfg.prompts, cfg.limit)
    # The run owns out_dir (a second run into it refuses), checked writable before any model loads.
    # Answers stream into temporary files, renamed into place with summary.json only when the run succeeds:
    # a failed run leaves the previous run's files as they were.
    with run_folder(out_dir, "python -m decode", need_bytes=MIN_FREE_BYTES), \
            staged_files(out_dir, f"writing answers into out_dir={out_dir}") as output:
        result = _run(cfg, Path(out_dir), questions, output, print_text)
        output.write_text("summary.json", json.dumps(result, indent=2))
    return result


def check_turn_lengths(base, questions: list[dict], max_new_tokens: int) -> None:
    """Every turn fits the context, before the first runs: a later turn's prompt holds the earlier turns and
    their answers, at most `max_new_tokens` each (and the template's few tokens)."""
    for q in questions:
        need = longest_context(base, [q], max_new_tokens)
        if need > base.max_context:
            chat = len(base.encode_chat([{"role": "user", "content": t} for t in q["turns"]]))
            raise UserError(f"question {q['question_id']}: its {len(q['turns'])} turn(s) may reach {need} tokens "
                            f"({chat} of prompts, up to max_new_tokens={max_new_tokens} per answer), which exceeds the "
                            f"model's context of {base.max_context}: lower max_new_tokens, or leave the question out")


def first_mismatches(methods: list[str], tokens_by_method: dict, question_id) -> list[dict]:
    """Where each method's turns first differ from ar's."""
    found = []
    for m in methods[1:]:
        for turn, (mine, ref) in enumerate(zip(tokens_by_method[m], tokens_by_method["ar"])):
            if mine != ref:
                first = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
                found.append({"method": m, "question_id": question_id, "turn": turn, "first_diff_token": first})
    return found


@dataclass
class Answers:
    """Every method's generations, categories and answer records, in question order."""

    gens: dict = field(default_factory=lambda: defaultdict(list))
    categories: dict = field(default_factory=lambda: defaultdict(list))
    records: dict = field(default_factory=lambda: defaultdict(list))
    mismatches: list = field(default_factory=list)


def answer_all(cfg, decoders: dict, questions: list[dict], output, model_id: str, print_text=None) -> Answers:
    """Every question through every method in turn, each answer written to its file as it comes."""
    methods, done = list(decoders), Answers()
    files = {m: output.open(f"answers_{m}.jsonl") for m in methods}
    # a bar on a terminal only (disable=None), and none while answers stream to the same terminal
    progress = tqdm(questions, desc=" + ".join(methods), unit="question", file=sys.stderr, dynamic_ncols=True,
                    disable=None if print_text is None else True)
    for question in progress:
        tokens_by_method = {}
        for m in methods:
            show = print_text if (print_text and m == cfg.method) else None
            choice, gens = answer(decoders[m], question, cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, on_text=show)
            record = answer_record(question, choice, model_id, m)
            done.records[m].append(record)
            files[m].write(json.dumps(record) + "\n")
            files[m].flush()
            done.gens[m] += gens
            done.categories[m] += [question["category"]] * len(gens)
            tokens_by_method[m] = [g.tokens for g in gens]
        done.mismatches += first_mismatches(methods, tokens_by_method, question["question_id"])
    return done


def _run(cfg, out_dir: Path, questions: list[dict], output, print_text=None) -> dict:
    from decode.decoder import Decoder
    from decode.spec import resolve_spec

    def first_prompt(base) -> list[int]:  # what threads=auto is measured on, once every turn is known to fit
        check_turn_lengths(base, questions, cfg.max_new_tokens)
        return base.encode_chat([{"role": "user", "content": questions[0]["turns"][0]}])

    spec, base, head = resolve_spec(**spec_options(cfg), probe=first_prompt, quiet=False)
    measured = spec.threads_measured_ms
    print(f"{spec.device}, {spec.dtype}, {spec.threads} threads (ar/eesd), {spec.stage_threads} per ppsd stage"
          + (f"; ms per AR step by threads: {measured}" if measured else ""), flush=True)
    decoders = {}
    try:
        for m in methods_of(cfg):
            decoders[m] = Decoder.from_spec(spec, m, base=base, head=head)
        pipelines = [d.pipeline for d in decoders.values() if d.pipeline is not None]
        for dec in decoders.values():  # a stage that dies during ar's or eesd's turn is an error at their next token
            dec.watched = pipelines
        if cfg.warmup:  # first calls allocate (and capture graphs); keep that out of the timings
            longest = longest_context(base, questions, cfg.max_new_tokens) if base.runtime.static else 0
            prompt = base.encode_chat([{"role": "user", "content": questions[0]["turns"][0]}])
            for dec in decoders.values():
                dec.warm_up(prompt, min(8, cfg.max_new_tokens), longest, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)
        captured_before = len(base.runtime.captured)
        done = answer_all(cfg, decoders, questions, output, cfg.model_id or Path(base.name).name, print_text)
    finally:
        for dec in decoders.values():
            dec.close()
    summary = summarize(done.gens, done.categories, cfg.gamma, done.records, speed_py_token_count(base.tokenizer))
    captures = len(base.runtime.captured) - captured_before
    return round_floats(_result(cfg, spec, base, decoders, summary, done, captures, len(questions), out_dir))


def _result(cfg, spec, base, decoders: dict, summary: dict, done: Answers, captures: int, questions: int,
            out_dir: Path) -> dict:
    """The JSON line `python -m decode` prints (and summary.json); `resolved`: why each auto became what it did."""
    figs = summary["figures"]
    main = figs[cfg.method]
    ticks = main.get("tick_costs")  # ppsd stages driven by this process (decode/local.py)
    return {
        "method": cfg.method,
        "stages": decoders[cfg.method].stages if cfg.method == "ppsd" else 1,
        "stage_layers": [[r.start, r.stop] for r in decoders["ppsd"].layout] if "ppsd" in decoders else None,
        "placement": decoders["ppsd"].placement if "ppsd" in decoders else None,
        "exit_layer": next((d.exit_layer for d in decoders.values() if d.exit_layer is not None), None),
        "model": base.name,
        "head_path": cfg.head_path,
        "dtype": spec.dtype,
        "runtime": base.runtime.describe(),
        "capture_s": round(base.runtime.capture_s, 2),
        "captures_while_timing": captures,
        "device": spec.device,
        "threads": spec.threads,
        "stage_threads": spec.stage_threads,
        "threads_measured_ms": spec.threads_measured_ms or None,
        "resolved": spec.reasons,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "questions": questions,
        "acceptance_rate": main["acceptance_rate"],
        "mean_accepted_length": main["mean_accepted_length"],
        "tokens_per_s": main["tokens_per_s"],            # every new token / all wall time, prefill included
        "decode_tokens_per_s": main["decode_tokens_per_s"],  # tokens after each answer's first / the time after it
        "speedup_vs_ar": main["speedup_vs_ar"],
        "decode_speedup_vs_ar": main["decode_speedup_vs_ar"],
        "spec_bench_speedup": main["spec_bench_speedup"],  # Spec-Bench speed.py's figure
        "predicted_speedup": main["predicted_speedup"],
        "measured_over_predicted": main["measured_over_predicted"],
        # stages driven by one process: a full tick against its stages one after another (1: no overlap, S: all)
        "stage_overlap": ticks["overlap"] if ticks else None,
        "handoff_us": ticks["handoff_s"] * 1e6 if ticks else None,  # one stage-to-stage hand-off, per position
        "lossless": not done.mismatches if cfg.temperature <= 0 else None,
        "lossless_by_method": {m: (not any(x["method"] == m for x in done.mismatches)) if cfg.temperature <= 0 else None
                               for m in decoders if m != "ar"},
        "mismatches": done.mismatches[:20],
        "fastest_method": summary["fastest_method"],
        "ar_step_ms": summary["ar_step_ms"],
        "compare": {m: figs[m] for m in decoders if m != cfg.method},
        "figures": figs[cfg.method],
        "out_dir": str(out_dir),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
