"""Self-distillation data: prompts -> responses the frozen base writes itself -> tokenized examples.

Prompts come from a JSONL file ({"id", "category", "turns": [str, ...]}) or a `datasets` path, or the
project's own default set (train/prompts/default.jsonl). The base answers every turn with its chat
template (batched generation, left padding): greedy, plus optionally some sampled answers. The
generated set is cached on disk under <cache>/data/<hash> keyed by model, prompts and generation
settings, written atomically, so a second run (and every rank of a distributed run) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from heads import UserError, sampling
from heads.base import cache_kwarg, cache_root
from heads.files import atomic_write_json, atomic_write_text, prompt_turns, read_prompts
from heads.hardware import is_auto, native_bf16

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "default.jsonl"
CACHE_VERSION = 3  # 3: one file per answer variant, seeds independent of the number of samples


@dataclass
class Example:
    """One answered turn: the loss covers the positions that predict the response tokens (and, with
    `loss_start`, the prompt's too)."""

    prompt_id: str
    turn: int
    sampled: bool
    input_ids: list[int]  # prompt (chat template, generation header) + response
    prompt_len: int
    loss_start: int | None = None  # first loss position; None = prompt_len - 1 (the response only)

    @property
    def loss_positions(self) -> range:
        """Positions whose next token is a response token: [prompt_len - 1, len - 1) (or from loss_start)."""
        start = self.prompt_len - 1 if self.loss_start is None else self.loss_start
        return range(start, len(self.input_ids) - 1)


def with_prompt_positions(examples: list[Example]) -> list[Example]:
    """Also train on the prompt's positions (the base's prediction of the user's text is a target as good as
    any, and free: the frozen forward computes it anyway), after the prefix every prompt shares (a system
    prompt of the chat template would otherwise be the same ~20 positions in every example)."""
    if not examples:
        return examples
    shared = len(os.path.commonprefix([e.input_ids[:e.prompt_len] for e in examples]))
    return [replace(e, loss_start=min(max(shared - 1, 0), e.prompt_len - 1)) for e in examples]


# ---------------------------------------------------------------- prompts


def _check_prompt(row: dict, where: str) -> dict:
    return {"id": str(row.get("id", where)), "category": str(row.get("category", "")), "turns": prompt_turns(row, where)}


def load_prompts(source, *, split: str = "train", field: str = "turns", limit: int | None = None) -> list[dict]:
    """A JSONL file, "default", a `datasets` path (local folder / hub id), or a list of them (concatenated)
    -> [{id, category, turns}]."""
    if _is_list(source):
        # each row remembers its source: the answers are cached per source, so adding one generates only its own
        rows = [r | {"source": str(s)} for s in source for r in _prompts_of(s, split, field)]
    else:
        rows = _prompts_of(source, split, field)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # ids key the held-out split; make them unique by position
        rows = [r | {"id": f"{r['id']}#{i}"} for i, r in enumerate(rows)]
    return rows[:limit] if limit else rows


def _is_list(source) -> bool:
    """data.prompts names several sources (a list, or Hydra's ListConfig of one)."""
    return isinstance(source, (list, tuple)) or type(source).__name__ == "ListConfig"


def source_names(source) -> str | list[str]:
    """data.prompts as JSON: a name, or a list of names."""
    return [str(x) for x in source] if _is_list(source) else str(source)


def _prompts_of(source: str, split: str, field: str) -> list[dict]:
    if source in (None, "", "default"):
        if not DEFAULT_PROMPTS.exists():
            raise UserError(f"the default prompt set {DEFAULT_PROMPTS} is missing: reinstall ppsd or pass data.prompts=FILE.jsonl")
        source = str(DEFAULT_PROMPTS)
    path = Path(source).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(__file__).parent / "prompts" / source).is_file():
        path = Path(__file__).parent / "prompts" / source  # a set the project ships, by its file name
    if path.suffix in (".jsonl", ".json") or path.is_file():
        rows = [{"id": str(q["question_id"]), "category": str(q["category"]), "turns": q["turns"]}
                for q in read_prompts(path)]
    else:
        rows = _dataset_prompts(source, split, field)
    if not rows:
        raise UserError(f"prompt source '{source}' holds no prompts: give it at least one {{\"turns\": [...]}} row")
    return rows


def _dataset_prompts(source: str, split: str, field: str) -> list[dict]:
    """Chat turns from a `datasets` path: column `field` holds a string, a list of strings or [{role, content}]."""
    import datasets

    try:
        ds = datasets.load_from_disk(source) if Path(source).is_dir() and (Path(source) / "dataset_info.json").exists() \
            else datasets.load_dataset(source, split=split)
    except Exception as e:
        raise UserError(f"prompt source '{source}' is neither a JSONL file nor a loadable dataset ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    if field not in ds.column_names:
        raise UserError(f"dataset '{source}' has no column '{field}' (columns: {ds.column_names}): set data.prompt_field")
    rows = []
    for i, row in enumerate(ds):
        turns = row[field]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):  # messages: keep the user turns
            turns = [t.get("content", "") for t in turns if t.get("role") == "user"]
        rows.append(_check_prompt({"id": row.get("id", i), "category": row.get("category", ""), "turns": turns},
                                  f"dataset '{source}' row {i}"))
    return rows


def heldout_ids(prompts: list[dict], fraction: float, seed: int) -> set[str]:
    """The prompts held out for evaluation: those whose hash of (seed, id) falls below `fraction`. A prompt's side
    does not depend on the other prompts, so a larger prompt set keeps the smaller one's held-out prompts (and
    α stays comparable across data sizes). At least one prompt is held out and one kept when there are two."""
    def u(i: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:8], "little") / 2**64

    score = {p["id"]: u(p["id"]) for p in prompts}
    held = {i for i, x in score.items() if x < fraction}
    if fraction > 0 and len(score) > 1:
        if not held:
            held = {min(score, key=score.get)}
        if len(held) == len(score):
            held.discard(max(score, key=score.get))
    return held


# ---------------------------------------------------------------- generation


def cache_key(base, prompts: list[dict], gen: dict) -> str:
    prompts = [{k: v for k, v in p.items() if k != "source"} for p in prompts]
    payload = json.dumps({"v": CACHE_VERSION, "model": base.name, "folder": str(base.folder),
                          "config": base.config.to_diff_dict() | {"model_type": base.config.model_type},
                          "prompts": prompts, "gen": gen}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def next_tokens(logits: torch.Tensor, *, sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy, or nucleus sampling at `temperature`: the decoders' sampler (heads/sampling.py) on a batch of rows."""
    return sampling.sample(logits, sampling.Sampling(temperature, top_p) if sample else sampling.GREEDY, generator)


def generate_batch(base, prompts_ids: list[list[int]], *, max_new_tokens: int, sample: bool, temperature: float,
                    top_p: float, seed: int) -> list[list[int]]:
    """Left-padded batched generation with one KV cache; returns each response up to and including its EOS.

    A row leaves the batch (and the cache) as soon as it ends. generate() keeps finished rows to the end of the
    longest answer: on the default set a quarter of its compute went to rows that had already stopped."""
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(base.eos_token_ids))
    width = max(map(len, prompts_ids))
    inputs = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids], device=base.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids], device=base.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(base.device).manual_seed(seed)
    eos = torch.tensor(sorted(base.eos_token_ids), device=base.device)
    cache = DynamicCache(config=base.config)
    rows = torch.arange(len(prompts_ids))  # which prompt each batch row answers
    responses = [[] for _ in prompts_ids]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = base.model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                                logits_to_keep=1, **{cache_kwarg(type(base.model).forward): cache}).logits[:, -1]
            tokens = next_tokens(logits, sample=sample, temperature=temperature, top_p=top_p, generator=generator)
            for row, token in zip(rows.tolist(), tokens.tolist()):
                responses[row].append(token)
            live = ~torch.isin(tokens, eos)
            if not live.any():
                break
            if not live.all():
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tokens, mask, positions = rows[keep.cpu()], tokens[keep], mask[keep], positions[keep]
            inputs = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return responses


def slot_count(prompts: int, batch_size: int) -> int:
    """Rows of the continuous batch: `batch_size`, or for fewer prompts the next power of two that holds
    them (so a small last turn adds at most log2(batch_size) shapes, each captured once)."""
    return min(batch_size, 1 << max(0, prompts - 1).bit_length())


def _prefill_rows(base, cache, index: torch.Tensor, prompts_ids: list[list[int]]) -> torch.Tensor:
    """Eager left-padded prefill of new prompts into rows `index` of the slot cache, each one's keys and values
    moved to columns [0, length) (a slot row holds its sequence from column 0); returns their last-position
    logits."""
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(base.eos_token_ids))
    width = max(map(len, prompts_ids))
    inputs = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids], device=base.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids], device=base.device)
    dynamic = DynamicCache(config=base.config)
    logits = base.model(input_ids=inputs, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1, **{cache_kwarg(type(base.model).forward): dynamic}).logits[:, -1]
    shift = torch.tensor([width - len(p) for p in prompts_ids], device=base.device)
    source = (torch.arange(width, device=base.device)[None] + shift[:, None]).clamp(max=width - 1)  # (k, width)

    def moved(x):  # (k, H, width, D): column c <- column c + pad
        return x.gather(2, source[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

    layers = dynamic.layers[:base.num_layers]
    if not cache.layers[0].is_initialized:
        cache.allocate(layers[0].keys.shape[1], layers[0].keys.shape[3], layers[0].keys.dtype, base.device)
    for layer, prefilled in zip(cache.layers, layers):
        layer.keys[index, :, :width] = moved(prefilled.keys)
        layer.values[index, :, :width] = moved(prefilled.values)
    cache.columns[index, 0] = torch.tensor(list(map(len, prompts_ids)), device=base.device)
    return logits


def generate_batch_static(base, prompts_ids: list[list[int]], *, max_new_tokens: int, sample: bool,
                           temperature: float, top_p: float, seed: int, batch_size: int | None = None,
                           check_every: int | None = None) -> list[list[int]]:
    """Every prompt's answer on the compiled runtime (`base.set_runtime(compile=True)`), continuously batched:
    `slot_count` rows on one preallocated cache run one compiled step of fixed shape; when a row's answer ends
    (EOS or max_new_tokens) the next prompt is prefilled into that row while the others go on, so one long
    answer holds one row, not a batch. The host looks at the rows every `check_every` steps (a read of device
    memory waits for the GPU; a finished row runs a few steps more, discarded). Greedy and sampled answers
    take this same path; a row's greedy answer is the one it gets alone."""
    from heads.cache import cache_len_for

    device, count = base.device, len(prompts_ids)
    if not count:
        return []
    check_every = check_every or (8 if device.type == "cuda" else 1)
    rows = slot_count(count, batch_size or count)
    max_len = cache_len_for(max(map(len, prompts_ids)) + max_new_tokens + check_every)
    cache = base.runtime.slot_cache(rows, max_len)
    key = ("slots", rows, max_len)  # the compiled step's shape, as the capture log counts it
    slots = torch.arange(max_len, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    eos = torch.tensor(sorted(base.eos_token_ids), device=device)
    width = max_new_tokens + check_every
    out = torch.zeros(rows, width, dtype=torch.long, device=device)
    made = torch.zeros(rows, dtype=torch.long, device=device)    # tokens generated per row
    ended = torch.ones(rows, dtype=torch.bool, device=device)    # EOS seen or max_new_tokens reached
    token = torch.zeros(rows, dtype=torch.long, device=device)   # each row's last token: the next step's input
    step = base.runtime.compiled("slot_step", base.next_token_logits)
    answers: list[list[int] | None] = [None] * count
    owner = [-1] * rows  # the prompt each row answers (-1: idle)
    queue = iter(range(count))
    with torch.inference_mode():
        while True:
            free = [r for r in range(rows) if owner[r] == -1]
            new = [(r, i) for r, i in zip(free, queue)]
            if new:
                index = torch.tensor([r for r, _ in new], device=device)
                logits = _prefill_rows(base, cache, index, [prompts_ids[i] for _, i in new])
                first = next_tokens(logits, sample=sample, temperature=temperature, top_p=top_p, generator=generator)
                token[index], made[index], out[index, 0] = first, 1, first
                ended[index] = torch.isin(first, eos) | (max_new_tokens <= 1)
                for r, i in new:
                    owner[r] = i
            if all(o == -1 for o in owner):
                break
            for _ in range(check_every):
                mask = (slots[None, None, None, :] <= cache.columns[:, None, :, None])
                logits = base.runtime.call(key, step, token[:, None], cache.columns, cache, mask)
                token = next_tokens(logits, sample=sample, temperature=temperature, top_p=top_p, generator=generator)
                out.scatter_(1, made.clamp(max=width - 1)[:, None], token[:, None])
                made.add_(1)
                cache.columns.add_(1).clamp_(max=max_len - 1)  # an idle or ended row's steps are thrown away
                ended |= torch.isin(token, eos) | (made >= max_new_tokens)
            finished = [r for r, e in enumerate(ended.tolist()) if e and owner[r] != -1]
            for r, row in zip(finished, out[finished].tolist() if finished else []):
                row = row[:max_new_tokens]
                end = next((j for j, x in enumerate(row) if x in base.eos_token_ids), len(row) - 1)
                answers[owner[r]] = row[:end + 1]
                owner[r] = -1
    return answers


def variant_seed(gen_seed: int, sample: int | None, turn: int, batch: int, rank: int) -> int:
    """The sampling seed of one generation batch; it does not depend on how many samples are asked for, so the
    set with k sampled answers per prompt is the first k of a larger one."""
    digest = hashlib.sha256(f"{gen_seed}/{sample}/{turn}/{batch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def generate_responses(base, prompts: list[dict], gen: dict, *, sample: int | None = None, rank: int = 0,
                       world: int = 1, progress: bool = True) -> list[dict]:
    """One answer to every turn of this rank's share of the prompts: greedy (`sample=None`) or sampled answer
    number `sample`. Multi-turn prompts are answered turn by turn: turn k sees this variant's own answers to
    turns < k. Returns rows {id, turn, sampled, sample, prompt_ids, response_ids}."""
    mine = prompts[rank::world]
    sampled = sample is not None
    history = {p["id"]: [] for p in mine}
    rows = []
    name = "greedy answers" if not sampled else f"sampled answers #{sample + 1}"
    bar = tqdm(total=sum(len(p["turns"]) for p in mine), desc=name, unit="resp", disable=not progress,
               dynamic_ncols=True)
    generate = generate_batch_static if base.runtime.compile else generate_batch
    for turn in range(max((len(p["turns"]) for p in mine), default=0)):
        encoded = {}
        for p in mine:
            if turn >= len(p["turns"]):
                continue
            history[p["id"]] = history[p["id"]] + [{"role": "user", "content": p["turns"][turn]}]
            ids = base.encode_chat(history[p["id"]])
            try:
                base.check_prompt_length(len(ids), gen["max_new_tokens"])
            except UserError as e:
                raise UserError(f"prompt '{p['id']}' turn {turn + 1}: {e}") from None
            if len(ids) > gen["max_prompt_tokens"]:
                raise UserError(f"prompt '{p['id']}' turn {turn + 1} has {len(ids)} tokens, over data.max_prompt_tokens="
                                f"{gen['max_prompt_tokens']}: shorten it or raise data.max_prompt_tokens")
            encoded[p["id"]] = ids
        group = sorted(encoded, key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
        # the compiled path batches continuously: the whole turn in one call, `batch_size` rows refilled
        size = len(group) if base.runtime.compile else gen["batch_size"]
        for b in range(0, len(group), max(size, 1)):
            chunk = group[b:b + size]
            answers = generate(base, [encoded[i] for i in chunk], max_new_tokens=gen["max_new_tokens"],
                               sample=sampled, temperature=gen["temperature"], top_p=gen["top_p"],
                               seed=variant_seed(gen["seed"], sample, turn, b, rank),
                               **({"batch_size": gen["batch_size"]} if base.runtime.compile else {}))
            for i, answer in zip(chunk, answers):
                rows.append({"id": i, "turn": turn, "sampled": sampled, "sample": -1 if sample is None else sample,
                             "prompt_ids": encoded[i], "response_ids": answer})
                text = base.tokenizer.decode([t for t in answer if t not in base.eos_token_ids])
                history[i] = history[i] + [{"role": "assistant", "content": text}]
            bar.update(len(chunk))
    bar.close()
    return rows


def sampled_answers(setting, device, quiet: bool = False) -> int:
    """`data.samples`, or auto: one sampled answer per prompt besides the greedy one where bf16 is native, none
    on fp32-only CPUs, where generation runs at about half the speed and would double the first run's time."""
    if not is_auto(setting):
        return int(setting)
    native, why = native_bf16(torch.device(device).type)
    if not quiet:
        print(f"data.samples=auto -> {int(native)} ({why})", flush=True)
    return int(native)


def generation_batch_size(base, cfg) -> int:
    """Rows per generation batch: `data.gen_batch_size`, or auto = 128 on a CPU (the fastest measured there),
    and on a GPU as many rows as half its free memory holds KV caches for (prompt + answer), at most 512."""
    if not is_auto(cfg.gen_batch_size):
        if int(cfg.gen_batch_size) < 1:
            raise UserError(f"data.gen_batch_size={cfg.gen_batch_size} must be >= 1 (or auto)")
        return int(cfg.gen_batch_size)
    if base.device.type != "cuda":
        return 128
    c = base.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    bytes_per_row = 2 * c.num_hidden_layers * kv_heads * head_dim * base.dtype.itemsize \
        * (int(cfg.max_prompt_tokens) + int(cfg.max_new_tokens)) + 4 * base.vocab_size
    free, _ = torch.cuda.mem_get_info(base.device)
    return max(1, min(512, int(0.5 * free) // bytes_per_row))


def generation_settings(cfg) -> dict:
    return {"max_new_tokens": int(cfg.max_new_tokens), "max_prompt_tokens": int(cfg.max_prompt_tokens),
            "samples": int(cfg.samples), "temperature": float(cfg.temperature), "top_p": float(cfg.top_p),
            "batch_size": int(cfg.gen_batch_size), "seed": int(cfg.gen_seed), "dtype": str(cfg.gen_dtype)}


def self_distillation_set(base, prompts: list[dict], cfg, *, cache_dir: str | None = None, rank: int = 0,
                          world: int = 1, barrier=lambda: None, progress: bool = True,
                          gen_base=None) -> tuple[list[dict], list[Path]]:
    """The greedy answers and `samples` sampled answers per prompt turn for (model, prompts, settings), and the
    cache folders they are in: one per prompt source (`load_prompts` of a list tags each row with its source),
    so adding a source generates only its answers.

    Each variant (greedy, sample 0, sample 1, ...) is cached in its own file, written once (ranks share the
    work): asking for more samples later generates only the new ones."""
    gen = generation_settings(cfg)
    order = {p["id"]: i for i, p in enumerate(prompts)}
    sources: dict[str, list[dict]] = {}
    for p in prompts:
        sources.setdefault(p.get("source", ""), []).append(p)
    rows, folders = [], []
    for group in sources.values():
        key = cache_key(base, group, {k: v for k, v in gen.items() if k not in ("batch_size", "samples")})
        folder = Path(cache_dir or cache_root() / "data") / key
        for sample in [None] + list(range(gen["samples"])):
            rows += _cached_variant(base, gen_base or base, group, gen, folder, sample, order, rank=rank, world=world,
                                    barrier=barrier, progress=progress)
        folders.append(folder)
    rows.sort(key=lambda r: (order[r["id"]], r["turn"], r["sampled"], r["sample"]))
    return rows, folders


def _cached_variant(base, gen_base, prompts, gen, folder: Path, sample: int | None, order: dict, *, rank: int,
                    world: int, barrier, progress: bool) -> list[dict]:
    """One variant's answers from its file in `folder`, generated first if it is not there."""
    done = folder / ("greedy.jsonl" if sample is None else f"sample-{sample:03d}.jsonl")
    if not done.exists():
        mine = generate_responses(gen_base, prompts, gen, sample=sample, rank=rank, world=world, progress=progress)
        parts = folder / f".parts-{done.stem}"
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(parts / f"rank{rank}.jsonl", "".join(json.dumps(r) + "\n" for r in mine))
        barrier()
        if rank == 0:
            merged = [json.loads(line) for r in range(world) for line in (parts / f"rank{r}.jsonl").read_text().splitlines()]
            merged.sort(key=lambda r: (order[r["id"]], r["turn"]))
            atomic_write_text(done, "".join(json.dumps(r) + "\n" for r in merged))
            variants = sorted(p.name for p in folder.glob("*.jsonl"))
            atomic_write_json(folder / "meta.json", {"model": base.name, "prompts": len(prompts), "variants": variants,
                                                     "gen": {k: v for k, v in gen.items() if k != "samples"}})
            shutil.rmtree(parts, ignore_errors=True)
        barrier()
    return [json.loads(line) for line in done.read_text().splitlines()]


def to_examples(rows: list[dict]) -> list[Example]:
    return [Example(prompt_id=r["id"], turn=r["turn"], sampled=r["sampled"], input_ids=r["prompt_ids"] + r["response_ids"],
                    prompt_len=len(r["prompt_ids"])) for r in rows if r["response_ids"]]


def pad_batch(examples: list[Example], pad_id: int) -> dict:
    """Right-padded ids, the padding mask and the loss mask (positions predicting response tokens)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, :len(e.input_ids)] = 1
        loss[i, e.loss_positions.start:e.loss_positions.stop] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
