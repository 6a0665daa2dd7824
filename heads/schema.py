"""What every entry point accepts: one typed model per command (pydantic: types, ranges, choices and `auto` on
the field), checked once by `validate(cfg, Model)` before any model loads or process starts. The entry point
passes the checked model on; nothing validates or resolves a key a second time from the YAML.

The defaults and their documentation stay in conf/*.yaml (Hydra composes them); the models hold no defaults, so
a key dropped from conf/ is a one-line error, not a silent fallback.

A failure is a `UserError` naming the key, the bad value and what to pass instead, so the user sees one
line and exit code 2. Checks that need the model (an exit layer against the base's depth, a prompt
against its context) stay where the model's config is read, but still run before any weights load.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt, MinLen
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from heads.errors import UserError

HEAD_TYPES = ("mlp", "transformer")
METHODS = ("ar", "eesd", "ppsd")
LOSSES = ("kl", "ce", "mix")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
BENCHMARK_MODES = ("all", "measure", "oracle", "theory", "runtime")
PLACEMENTS = ("auto", "streams", "devices", "processes")


# ---------------------------------------------------------------- the value types


def _number_as_text(value):
    """A folder or a name may well look like a number (Hydra reads `out_dir=2024` as an int)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _lower(value):
    return value.lower() if isinstance(value, str) else value


Text = Annotated[str, BeforeValidator(_number_as_text), MinLen(1)]
Auto = Annotated[Literal["auto"], BeforeValidator(_lower)]
Count = Annotated[int, Ge(1)]                  # a count of at least one
Natural = Annotated[int, Ge(0)]
Fraction = Annotated[float, Ge(0), Le(1)]
Positive = Annotated[float, Gt(0)]
Millis = Annotated[float, Ge(0)]
Dtype = Literal[DTYPE_NAMES]
Device = Annotated[str, StringConstraints(pattern=r"^(cpu|cuda(:\d+)?)$")] | Auto | None
Threads = Count | Auto | None
HeadType = Literal[HEAD_TYPES]
Method = Literal[METHODS]
Stages = Annotated[int, Ge(2)]


def nonempty(item) -> Any:
    return Annotated[list[item], MinLen(1)]


class Options(BaseModel):
    """Strict: an int is not a bool nor "3"; an unknown key is an error (Hydra refuses most of them first)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def check_gamma(gamma: int, key: str = "gamma") -> None:
    """On batch-invariant kernels EESD's verify pass (gamma + 1 positions) must run row by row, which only calls
    of at most MAX_ROWS positions do: a longer one is one GEMM again, and bf16 eesd stops being lossless."""
    from heads.batch_invariant import MAX_ROWS

    if gamma + 1 > MAX_ROWS:
        raise UserError(f"{key}={gamma} with batch-invariant kernels: a verify pass of gamma + 1 = {gamma + 1} positions "
                        f"is more than the {MAX_ROWS} that run row by row, so eesd would not stay lossless: pass "
                        f"{key} <= {MAX_ROWS - 1} (or batch_invariant=false)")


# ---------------------------------------------------------------- train


class HeadOptions(Options):
    type: HeadType = Field(title="head type")
    mlp_hidden: Natural
    lr: Positive


class WandbOptions(Options):
    enabled: bool
    mode: Literal["online", "offline", "disabled"] | None
    project: Text
    entity: Text | None
    name: Text | None


class DataOptions(Options):
    prompts: Text | nonempty(Text)
    prompt_split: Text
    prompt_field: Text
    max_prompts: Count | None
    max_prompt_tokens: Count
    max_new_tokens: Count
    samples: Natural | Auto
    prompt_positions: bool
    temperature: Positive
    top_p: Annotated[float, Gt(0), Le(1)]
    gen_batch_size: Count | Auto
    gen_dtype: Dtype | Auto | None
    gen_compile: bool | Auto
    gen_seed: Natural
    heldout_fraction: Annotated[float, Ge(0), Lt(1)]
    cache_dir: Text | None


class ZeroOptions(Options):
    model_config = ConfigDict(extra="allow")
    stage: Annotated[int, Ge(0), Le(3)]


class DeepSpeedOptions(Options):
    """DeepSpeed's own config, passed to it as it is; only the ZeRO stage is ours to check."""

    model_config = ConfigDict(extra="allow")
    zero_optimization: ZeroOptions


class TrainConfig(Options):
    model: Text
    trust_remote_code: bool
    device: Device
    dtype: Dtype | Auto
    matmul_dtype: Dtype | Auto | None
    # the range 1..N-1 needs the base's depth: train/recipe.py checks it from the base's config
    exit_layer: int | None
    exit_layers: nonempty(int) | None
    head: HeadOptions
    loss: Literal[LOSSES] = Field(title="loss")
    temperature: Positive
    ce_weight: Fraction
    epochs: Count
    max_steps: Count | None
    batch_size: Count
    warmup: Annotated[float, Ge(0), Lt(1)]
    min_lr_ratio: Fraction
    weight_decay: Annotated[float, Ge(0)]
    grad_clip: Annotated[float, Ge(0)]
    cache_features: bool
    forward_batch_size: Count | Auto
    checkpoint_every: Count
    eval_every: Count | None
    resume: bool
    init_from: Text | None
    out_dir: Text
    seed: Natural
    threads: Threads
    wandb: WandbOptions
    data: DataOptions
    deepspeed: DeepSpeedOptions

    @model_validator(mode="after")
    def _an_exit_layer(self):
        if self.exit_layers is None and self.exit_layer is None:
            raise UserError("exit_layer=null and exit_layers=null: pass exit_layer=E or exit_layers=[E1,E2,...]")
        return self


# ---------------------------------------------------------------- decode


class DecodeConfig(Options):
    method: Method = Field(title="method")
    compare: list[Method] | None
    head_path: Text | None
    model: Text | None
    prompts: Text | None
    prompt: Text | None
    limit: Count | None
    max_new_tokens: Count
    temperature: Annotated[float, Ge(0)]
    top_p: Annotated[float, Gt(0), Le(1)]
    top_k: Natural
    seed: Natural
    dtype: Dtype | Auto
    batch_invariant: bool | Auto
    compile: bool | Auto
    device: Device
    threads: Threads
    stages: Stages
    stage_layers: list[list[Natural]] | None
    stage_threads: Threads
    placement: Literal[PLACEMENTS] = Field(title="placement")
    window: Count | None
    gamma: Count
    timeout_s: Positive
    warmup: bool
    stream: bool
    interactive: bool
    out_dir: Text | None
    model_id: Text | None

    @model_validator(mode="after")
    def _consistent(self):
        if self.interactive:  # prompts come from stdin
            pass
        elif self.prompt is None and self.prompts is None:
            raise UserError("nothing to decode: pass prompts=FILE.jsonl (Spec-Bench format) or prompt='text'")
        if self.prompt is not None and self.prompts is not None:
            raise UserError("both prompt= and prompts= are set: pass one (prompt='text' or prompts=FILE.jsonl)")
        needy = sorted({self.method, *(self.compare or [])} & {"eesd", "ppsd"})
        if needy and not self.head_path:
            raise UserError(f"method {needy[0]} needs an exit head: pass head_path=FOLDER_OR_HUB_ID "
                            "(or method=ar compare=[ar])")
        pairs, stages = self.stage_layers, self.stages
        if pairs is not None and (not all(len(p) == 2 for p in pairs) or len(pairs) not in (stages - 1, stages)):
            raise UserError(f"stage_layers={pairs} must be {stages - 1} [start, end) pairs for stages={stages}, "
                            "e.g. stage_layers=[[15,30]] for stages=2")
        return self

    @property
    def methods(self) -> list[str]:
        """`method` and `compare`, ar (the baseline) first."""
        methods = [self.method] + [m for m in (self.compare or []) if m != self.method]
        return ["ar"] + [m for m in methods if m != "ar"]


# ---------------------------------------------------------------- benchmark


class TheoryOptions(Options):
    num_layers: Stages
    layer_ms: Positive
    head_ms: Millis
    lm_head_ms: Millis
    embed_ms: Millis
    send_ms: Millis
    feedback_ms: Millis | None
    verify_batch_slope: Millis
    allreduce_ms: Millis | None
    alphas: nonempty(Fraction)
    stages: nonempty(Stages)
    exit_layers: Count | nonempty(Count) | None


class BenchmarkConfig(Options):
    mode: Literal[BENCHMARK_MODES] = Field(title="mode")
    model: Text
    head_path: Text | None
    exit_layer: Count | None
    head_type: HeadType
    dtype: Dtype | Auto
    device: Device
    batch_invariant: bool
    compile: bool | Auto
    prompts: Text
    num_prompts: Count
    max_new_tokens: Count
    stages: Stages
    ar_threads: Threads
    stage_threads: Threads
    window: Count | None
    gammas: nonempty(Count)
    alphas: nonempty(Fraction)
    warmup_tokens: Natural
    seed: Natural
    target_tolerance: Positive
    theory: TheoryOptions

    @model_validator(mode="after")
    def _a_head_to_measure(self):
        if self.mode in ("measure", "all") and not self.head_path:
            raise UserError(f"mode={self.mode} measures a trained head: pass head_path=FOLDER (or use mode=oracle)")
        if self.batch_invariant:
            check_gamma(max(self.gammas), "gammas")
        return self


# ---------------------------------------------------------------- sweep and export


class _SweepOptions(Options):
    model: Text
    stages: nonempty(Stages)
    gammas: list[Count]
    prompts: Text | None
    limit: Count | None
    max_new_tokens: Count
    out_dir: Text | None
    launcher: Literal["multirun", "subprocess"]
    train_overrides: list[Text]
    decode_overrides: list[Text]

    @model_validator(mode="after")
    def _prompts_given(self):
        if not self.prompts:
            raise UserError("no prompt set: pass prompts=<Spec-Bench-format JSONL>")
        return self


class SweepConfig(_SweepOptions):
    exit_layers: nonempty(Count)
    heads: nonempty(HeadType)


class SweepPointWandb(Options):
    project: Text
    entity: Text | None


class SweepPointConfig(_SweepOptions):
    """A W&B grid point names its one layer and head; the sweep's list keys are filled from them."""

    exit_layer: Count
    head_type: HeadType
    wandb: SweepPointWandb
    exit_layers: list[Count]  # the sweep's, unused here
    heads: list[HeadType]


class ExportConfig(Options):
    head_path: Text | None
    repo_id: Text | None
    private: bool
    token: Text | None
    local_dir: Text | None
    results: Text | None
    overwrite: bool

    @model_validator(mode="after")
    def _one_target(self):
        if not self.head_path:
            raise UserError("no head given: pass head_path=<head folder>")
        if bool(self.repo_id) == bool(self.local_dir):
            raise UserError("pass exactly one of repo_id=owner/name (upload to the Hub) or local_dir=<folder> "
                            "(write locally)")
        if self.repo_id and (self.repo_id.count("/") != 1 or self.repo_id.startswith(("/", ".", "~"))):
            raise UserError(f"repo_id={self.repo_id} is not a Hub repo id: use owner/name")
        return self


# ---------------------------------------------------------------- the keys and their one-line description


def options(model: type[Options], prefix: str = "") -> dict[str, Any]:
    """Every key of `model` (dotted, nested options walked) -> its annotation (constraints included)."""
    keys = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Options):
            keys |= options(field.annotation, f"{prefix}{name}.")
        else:
            keys[prefix + name] = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return keys


def alternatives(annotation) -> list:
    """The members of a union (a plain type is its own one member), constraints kept on each."""
    if typing.get_origin(annotation) is Annotated:
        inner, *meta = typing.get_args(annotation)
        if typing.get_origin(inner) in (Union, types.UnionType):
            return [Annotated[(a, *meta)] for a in typing.get_args(inner)]
        return [annotation]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in alternatives(a)]
    return [annotation]


def unwrap(annotation) -> tuple[Any, list]:
    """(the bare type, its constraints)."""
    meta = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *more = typing.get_args(annotation)
        meta = more + meta
    return annotation, meta


def describe(annotation) -> str:
    """What a key takes, in words: "an integer >= 1 (or auto or null)"."""
    words, extras = [], []
    for member in alternatives(annotation):
        bare, meta = unwrap(member)
        if bare is type(None):
            extras.append("null")
        elif typing.get_origin(bare) is Literal and typing.get_args(bare) == ("auto",):
            extras.append("auto")
        elif typing.get_origin(bare) is Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(bare))))
        elif typing.get_origin(bare) is list:
            item = describe(typing.get_args(bare)[0]).removeprefix("an ").removeprefix("a ")
            words.append(f"a{' non-empty' if any(isinstance(m, MinLen) for m in meta) else ''} list of {item}")
        elif bare is bool:
            words.append("true or false")
        elif bare in (int, float):
            bounds = [f"{sign} {getattr(m, attr):g}" for m in meta for cls, attr, sign in
                      ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<")) if isinstance(m, cls)]
            words.append(f"{'an integer' if bare is int else 'a number'} {' and '.join(bounds)}".strip())
        elif any(isinstance(m, StringConstraints) for m in meta):
            words.append("cpu, cuda or cuda:N")
        else:
            words.append("a text value")
    text = " or ".join(words) if len(words) < 3 else ", ".join(words)
    return text + (f" (or {' or '.join(extras)})" if extras else "")


# ---------------------------------------------------------------- validation


def _shown(value) -> str:
    return "null" if value is None else str(value).replace("\n", " ")


def _plain(cfg, name: str) -> dict:
    """The config as plain values, interpolations resolved; a missing mandatory value (`???`) or one that
    cannot be resolved is a one-line error."""
    if not OmegaConf.is_config(cfg):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key or "a value"
        raise UserError(f"{key} is required: pass {key}=<value>") from None
    except OmegaConfBaseException as e:
        key = e.full_key or name
        raise UserError(f"{key} cannot be read ({str(e).splitlines()[0]}): check its value") from None


def _first_error(model: type[Options], values: dict, error: dict) -> UserError:
    """The first error pydantic found, as one line about the key it is in."""
    loc, keys, cls, value = list(error["loc"]), [], model, values
    while loc and isinstance(cls, type) and issubclass(cls, Options) and loc[0] in cls.model_fields:
        name = loc.pop(0)
        keys.append(name)
        value = value.get(name) if isinstance(value, dict) else None
        cls = cls.model_fields[name].annotation
    key = ".".join(keys)
    annotation = options(model).get(key)
    if error["type"] == "extra_forbidden" or annotation is None:
        return UserError(f"'{'.'.join(map(str, error['loc']))}' is not an option of this command: check its spelling "
                         "against conf/")
    if error["type"] == "missing":
        return UserError(f"{key} is missing from the config: restore it in conf/ (it takes {describe(annotation)})")
    choices = [typing.get_args(unwrap(a)[0]) for a in alternatives(annotation)
               if typing.get_origin(unwrap(a)[0]) is Literal]
    noun = model_field(model, key).title
    if noun and isinstance(value, str) and choices:
        return UserError(f"unknown {noun} '{value}' ({key}={value}): use {describe(annotation)}")
    return UserError(f"{key}={_shown(value)} is not valid: {key} takes {describe(annotation)}")


def model_field(model: type[Options], key: str):
    *parents, name = key.split(".")
    for parent in parents:
        model = model.model_fields[parent].annotation
    return model.model_fields[name]


def validate(cfg, model: type[Options]) -> Options:
    """Check `cfg` (a DictConfig or a dict) against `model`; returns the checked, typed options. Raises a
    one-line UserError for the first bad key, or the first cross-key check that fails."""
    values = _plain(cfg, model.__name__)
    try:
        checked = model.model_validate(values)
    except ValidationError as e:
        raise _first_error(model, values, e.errors()[0]) from None
    from heads.hardware import check_device

    device = getattr(checked, "device", None)  # a well-formed device this machine cannot run: its own one line
    if device not in (None, "auto"):
        check_device(device)
    return checked
