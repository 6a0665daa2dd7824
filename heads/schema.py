"""What every entry point accepts: one typed model per command (types, ranges, choices and `auto` on the field,
the value types and `validate` in heads/config.py), checked once before any model loads or process starts. The
entry point passes the checked model on; nothing validates or resolves a key a second time from the YAML.

A failure is a `UserError` naming the key, the bad value and what to pass instead, so the user sees one
line and exit code 2. Checks that need the model (an exit layer against the base's depth, a prompt
against its context) stay where the model's config is read, but still run before any weights load.
"""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, Field, model_validator

from heads.config import Auto, Count, Device, Fraction, Millis, Natural, Options, Positive, Text, Threads, nonempty
from heads.errors import UserError

HEAD_TYPES = ("mlp", "transformer")
METHODS = ("ar", "eesd", "ppsd")
LOSSES = ("kl", "ce", "mix", "topk")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
BENCHMARK_MODES = ("all", "measure", "oracle", "theory", "runtime")
PLACEMENTS = ("auto", "streams", "devices", "processes")


Dtype = Literal[DTYPE_NAMES]
HeadType = Literal[HEAD_TYPES]
Method = Literal[METHODS]
Stages = Annotated[int, Ge(2)]


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
    mlp_layers: Count
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
    top_k: Count
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
    tp_shard_ms: dict[Stages, Positive] | None
    alphas: nonempty(Fraction)
    stages: nonempty(Stages)
    exit_layers: Count | nonempty(Count) | None


class BenchmarkConfig(Options):
    mode: Literal[BENCHMARK_MODES] = Field(title="mode")
    model: Text | None
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
    plot: Text | None
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

