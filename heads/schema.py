"""What every entry point accepts: one declarative spec per command (key -> rule, plus cross-key checks) and
one `validate(cfg, spec)` each runs first, before any model loads or process starts.

A failure is a `UserError` naming the key, the bad value and what to pass instead, so the user sees one
line and exit code 2. Checks that need the model (an exit layer against the base's depth, a prompt
against its context) stay where the model's config is read, but still run before any weights load.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from heads.errors import UserError

HEAD_TYPES = ("mlp", "transformer")
METHODS = ("ar", "eesd", "ppsd")
LOSSES = ("kl", "ce", "mix")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
BENCHMARK_MODES = ("all", "measure", "oracle", "theory", "runtime")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_MISSING = object()


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What one key takes. `kind`: int | float | bool | str | choice | dtype | device | list | one_or_list."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    above: bool = False      # lo is exclusive (> lo, not >= lo)
    below: bool = False      # hi is exclusive
    choices: tuple = ()
    null: bool = False
    auto: bool = False
    item: Rule | None = None  # list items
    nonempty: bool = False
    what: str = ""            # a choice's noun in its message ("unknown head type 'lstm'")

    def describe(self) -> str:
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = [f"{'>' if self.above else '>='} {self.lo:g}" if self.lo is not None else "",
                      f"{'<' if self.below else '<='} {self.hi:g}" if self.hi is not None else ""]
            text = " and ".join(b for b in bounds if b)
            text = f"{noun} {text}".strip()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a text value"
        elif self.kind in ("choice", "dtype"):
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "device":
            text = "cpu, cuda or cuda:N"
        elif self.kind == "one_or_list":
            text = f"{self.item.describe()} or a list of them"
        else:
            text = f"a{' non-empty' if self.nonempty else ''} list of {self.item.describe().removeprefix('an ').removeprefix('a ')}"
        extras = [x for x, on in (("auto", self.auto), ("null", self.null)) if on]
        return text + (f" (or {' or '.join(extras)})" if extras else "")

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        if self.auto and str(value).lower() == "auto":
            return True
        if self.kind == "int":
            return isinstance(value, int) and not isinstance(value, bool) and self._in_range(value)
        if self.kind == "float":
            return isinstance(value, (int, float)) and not isinstance(value, bool) and self._in_range(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":  # a folder or a name may well look like a number
            return isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) != ""
        if self.kind in ("choice", "dtype"):
            return isinstance(value, str) and value in self.choices
        if self.kind == "device":
            return isinstance(value, str) and bool(_DEVICE.match(value))
        if self.kind == "one_or_list":
            return self.item.accepts(value) or (isinstance(value, list) and bool(value)
                                                 and all(self.item.accepts(v) for v in value))
        return isinstance(value, list) and (bool(value) or not self.nonempty) and all(self.item.accepts(v) for v in value)

    def _in_range(self, value) -> bool:
        if self.lo is not None and (value <= self.lo if self.above else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.below else value <= self.hi)


def integer(lo=None, hi=None, **kw) -> Rule:
    return Rule("int", lo, hi, **kw)


def number(lo=None, hi=None, **kw) -> Rule:
    return Rule("float", lo, hi, **kw)


def flag(**kw) -> Rule:
    return Rule("bool", **kw)


def text(**kw) -> Rule:
    return Rule("str", **kw)


def choice(*values, **kw) -> Rule:
    return Rule("choice", choices=tuple(values), **kw)


def dtype(**kw) -> Rule:
    return Rule("dtype", choices=DTYPE_NAMES, **kw)


def device() -> Rule:
    return Rule("device", auto=True, null=True)


def list_of(item: Rule, nonempty: bool = False, **kw) -> Rule:
    return Rule("list", item=item, nonempty=nonempty, **kw)


def threads() -> Rule:
    return integer(1, auto=True, null=True)


@dataclass(frozen=True)
class Spec:
    """An entry point's keys (dotted paths into its config) and the checks that span several keys."""

    name: str
    keys: dict[str, Rule]
    checks: tuple[Callable[[dict], None], ...] = field(default=())


# ---------------------------------------------------------------- validation


def _shown(value) -> str:
    return "null" if value is None else str(value).replace("\n", " ")


def _lookup(cfg, key: str):
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except MissingMandatoryValue:
        raise UserError(f"{key} is required: pass {key}=<value>") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{key} cannot be read ({str(e).splitlines()[0]}): check its value") from None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def validate(cfg, spec: Spec) -> dict:
    """Check every key of `spec` in `cfg` and then its cross-key checks; returns the plain values checked
    (dotted key -> value). Raises UserError for the first bad one."""
    values = {}
    for key, rule in spec.keys.items():
        value = _lookup(cfg, key)
        if value is _MISSING:
            raise UserError(f"{spec.name}: {key} is missing from the config: restore it in conf/ (it takes {rule.describe()})")
        if not rule.accepts(value):
            if rule.what and isinstance(value, str):
                raise UserError(f"unknown {rule.what} '{value}' ({key}={value}): use {rule.describe()}")
            raise UserError(f"{key}={_shown(value)} is not valid: {key} takes {rule.describe()}")
        values[key] = value
    for check in spec.checks:
        check(values)
    from heads.hardware import check_device

    for key, rule in spec.keys.items():  # a well-formed device this machine cannot run: its own one line
        if rule.kind == "device" and values[key] is not None and str(values[key]).lower() != "auto":
            check_device(values[key])
    return values


# ---------------------------------------------------------------- cross-key checks


def _train_exit_layers(v: dict) -> None:
    if v["exit_layers"] is None and v["exit_layer"] is None:
        raise UserError("exit_layer=null and exit_layers=null: pass exit_layer=E or exit_layers=[E1,E2,...]")


def _decode_prompts(v: dict) -> None:
    if v["interactive"]:  # prompts come from stdin
        return
    if v["prompt"] is None and v["prompts"] is None:
        raise UserError("nothing to decode: pass prompts=FILE.jsonl (Spec-Bench format) or prompt='text'")
    if v["prompt"] is not None and v["prompts"] is not None:
        raise UserError("both prompt= and prompts= are set: pass one (prompt='text' or prompts=FILE.jsonl)")


def _decode_head(v: dict) -> None:
    methods = {v["method"], *(v["compare"] or [])}
    needy = sorted(methods & {"eesd", "ppsd"})
    if needy and not v["head_path"]:
        raise UserError(f"method {needy[0]} needs an exit head: pass head_path=FOLDER_OR_HUB_ID "
                        "(or method=ar compare=[ar])")


def _decode_stage_layers(v: dict) -> None:
    pairs = v["stage_layers"]
    if pairs is None:
        return
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs) or len(pairs) not in (v["stages"] - 1, v["stages"]):
        raise UserError(f"stage_layers={pairs} must be {v['stages'] - 1} [start, end) pairs for stages={v['stages']}, "
                        "e.g. stage_layers=[[15,30]] for stages=2")


def _benchmark_head(v: dict) -> None:
    if v["mode"] in ("measure", "all") and not v["head_path"]:
        raise UserError(f"mode={v['mode']} measures a trained head: pass head_path=FOLDER (or use mode=oracle)")


def _sweep_prompts(v: dict) -> None:
    if not v["prompts"]:
        raise UserError("no prompt set: pass prompts=<Spec-Bench-format JSONL>")


def _export_target(v: dict) -> None:
    if not v["head_path"]:
        raise UserError("no head given: pass head_path=<head folder>")
    if bool(v["repo_id"]) == bool(v["local_dir"]):
        raise UserError("pass exactly one of repo_id=owner/name (upload to the Hub) or local_dir=<folder> (write locally)")
    repo_id = v["repo_id"]
    if repo_id and (str(repo_id).count("/") != 1 or str(repo_id).startswith(("/", ".", "~"))):
        raise UserError(f"repo_id={repo_id} is not a Hub repo id: use owner/name")


# ---------------------------------------------------------------- the specs

_LAYER = integer(1)

TRAIN = Spec("train", {
    "model": text(),
    "trust_remote_code": flag(),
    "device": device(),
    "dtype": dtype(auto=True),
    "matmul_dtype": dtype(auto=True, null=True),
    # the range 1..N-1 needs the base's depth: train/recipe.py checks it from the base's config
    "exit_layer": integer(null=True),
    "exit_layers": list_of(integer(), nonempty=True, null=True),
    "head.type": choice(*HEAD_TYPES, what="head type"),
    "head.mlp_hidden": integer(0),
    "head.lr": number(0, above=True),
    "loss": choice(*LOSSES, what="loss"),
    "temperature": number(0, above=True),
    "ce_weight": number(0, 1),
    "epochs": integer(1),
    "max_steps": integer(1, null=True),
    "batch_size": integer(1),
    "warmup": number(0, 1, below=True),
    "min_lr_ratio": number(0, 1),
    "weight_decay": number(0),
    "grad_clip": number(0),
    "cache_features": flag(),
    "forward_batch_size": integer(1, auto=True),
    "checkpoint_every": integer(1),
    "eval_every": integer(1, null=True),
    "resume": flag(),
    "init_from": text(null=True),
    "out_dir": text(),
    "seed": integer(0),
    "threads": threads(),
    "wandb.enabled": flag(),
    "wandb.mode": choice("online", "offline", "disabled", null=True),
    "wandb.project": text(),
    "wandb.entity": text(null=True),
    "wandb.name": text(null=True),
    "data.prompts": Rule("one_or_list", item=text()),
    "data.prompt_split": text(),
    "data.prompt_field": text(),
    "data.max_prompts": integer(1, null=True),
    "data.max_prompt_tokens": integer(1),
    "data.max_new_tokens": integer(1),
    "data.samples": integer(0, auto=True),
    "data.prompt_positions": flag(),
    "data.temperature": number(0, above=True),
    "data.top_p": number(0, 1, above=True),
    "data.gen_batch_size": integer(1, auto=True),
    "data.gen_dtype": dtype(auto=True, null=True),
    "data.gen_compile": Rule("bool", auto=True),
    "data.gen_seed": integer(0),
    "data.heldout_fraction": number(0, 1, below=True),
    "data.cache_dir": text(null=True),
    "deepspeed.zero_optimization.stage": integer(0, 3),
}, (_train_exit_layers,))

DECODE = Spec("decode", {
    "method": choice(*METHODS, what="method"),
    "compare": list_of(choice(*METHODS), null=True),
    "head_path": text(null=True),
    "model": text(null=True),
    "prompts": text(null=True),
    "prompt": text(null=True),
    "limit": integer(1, null=True),
    "max_new_tokens": integer(1),
    "temperature": number(0),
    "top_p": number(0, 1, above=True),
    "top_k": integer(0),
    "seed": integer(0),
    "interactive": flag(),
    "dtype": dtype(auto=True),
    "batch_invariant": Rule("bool", auto=True),
    "compile": Rule("bool", auto=True),
    "device": device(),
    "threads": threads(),
    "stages": integer(2),
    "stage_layers": list_of(list_of(integer(0)), null=True),
    "stage_threads": threads(),
    "window": integer(1, null=True),
    "gamma": integer(1),
    "timeout_s": number(0, above=True),
    "warmup": flag(),
    "stream": flag(),
    "out_dir": text(null=True),
    "model_id": text(null=True),
}, (_decode_prompts, _decode_head, _decode_stage_layers))

_MS = number(0)

BENCHMARK = Spec("benchmark", {
    "mode": choice(*BENCHMARK_MODES, what="mode"),
    "model": text(null=True),
    "head_path": text(null=True),
    "exit_layer": integer(1, null=True),
    "head_type": choice(*HEAD_TYPES),
    "dtype": dtype(auto=True),
    "device": device(),
    "batch_invariant": flag(),
    "compile": Rule("bool", auto=True),
    "prompts": text(),
    "num_prompts": integer(1),
    "max_new_tokens": integer(1),
    "stages": integer(2),
    "ar_threads": threads(),
    "stage_threads": threads(),
    "window": integer(1, null=True),
    "gammas": list_of(integer(1), nonempty=True),
    "alphas": list_of(number(0, 1), nonempty=True),
    "warmup_tokens": integer(0),
    "seed": integer(0),
    "target_tolerance": number(0, above=True),
    "plot": text(null=True),
    "theory.num_layers": integer(2),
    "theory.layer_ms": number(0, above=True),
    "theory.head_ms": _MS,
    "theory.lm_head_ms": _MS,
    "theory.embed_ms": _MS,
    "theory.send_ms": _MS,
    "theory.feedback_ms": number(0, null=True),
    "theory.verify_batch_slope": _MS,
    "theory.allreduce_ms": number(0, null=True),
    "theory.alphas": list_of(number(0, 1), nonempty=True),
    "theory.stages": list_of(integer(2), nonempty=True),
    "theory.exit_layers": Rule("one_or_list", item=_LAYER, null=True),
}, (_benchmark_head,))

_SWEEP_KEYS = {
    "model": text(),
    "exit_layers": list_of(_LAYER, nonempty=True),
    "heads": list_of(choice(*HEAD_TYPES), nonempty=True),
    "stages": list_of(integer(2), nonempty=True),
    "gammas": list_of(integer(1)),
    "prompts": text(null=True),
    "limit": integer(1, null=True),
    "max_new_tokens": integer(1),
    "out_dir": text(null=True),
    "launcher": choice("multirun", "subprocess"),
    "train_overrides": list_of(text()),
    "decode_overrides": list_of(text()),
}

SWEEP = Spec("sweep", _SWEEP_KEYS, (_sweep_prompts,))

# A W&B grid point names its one layer and head; the sweep's list keys are filled from them.
SWEEP_POINT = Spec("sweep_point", {k: v for k, v in _SWEEP_KEYS.items() if k not in ("exit_layers", "heads")} | {
    "exit_layer": _LAYER,
    "head_type": choice(*HEAD_TYPES),
    "wandb.project": text(),
    "wandb.entity": text(null=True),
}, (_sweep_prompts,))

EXPORT = Spec("export", {
    "head_path": text(null=True),
    "repo_id": text(null=True),
    "private": flag(),
    "token": text(null=True),
    "local_dir": text(null=True),
    "results": text(null=True),
    "overwrite": flag(),
}, (_export_target,))
