"""The training loop: freeze the base, self-distil one exit head per requested layer with DeepSpeed.

One frozen-base forward per batch serves every head: it collects the hidden state after each exit
layer and the final hidden state, whose final norm + LM head give the teacher's distribution on the
fly. By default those hidden states are computed once per example and kept in memory across epochs
(`cache_features`), since on a CPU the base forward is what costs; the teacher logits are still
recomputed from the frozen base every step, so nothing the size of the vocabulary is ever stored.

The frozen base's matmuls (its forward under autocast, the full-vocabulary LM head, teacher and student
side, through one kept copy) run in `matmul_dtype` (bf16: ~2x faster on CPU, and the LM head dominates a
step); the head's own weights and all loss math stay fp32. The teacher's argmax and probabilities are
computed once per step for every head (`TeacherView`). Held-out metrics always use the exact fp32 teacher.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from heads import UserError, build_head, load_base, load_head
from heads.base import model_num_layers, model_source_id, resolve_model_path
from heads.hardware import check_device, check_ranks_fit_gpus, free_port, is_auto, process_threads, resolve_dtype
from heads.files import atomic_folder, atomic_write_text
from heads.schema import TRAIN, validate
from train import data as D
from train.losses import TeacherView, distill_loss, expected_acceptance, top1_agreement


# ---------------------------------------------------------------- distributed set-up


def train_device(setting) -> torch.device:
    """auto: this rank's GPU when CUDA is available (NCCL needs one GPU per rank), else the CPU."""
    if is_auto(setting):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        check_ranks_fit_gpus()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    device = check_device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: torch.device, threads=None):
    """Use the launcher's rank variables (torchrun, deepspeed) or make a world of one: NCCL on this rank's
    GPU (made the current device first: NCCL's collectives and object broadcasts use it), else gloo."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # one process per core share, or they fight over the cores
        torch.set_num_threads(process_threads(threads, int(os.environ["LOCAL_WORLD_SIZE"])))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                               timeout=datetime.timedelta(hours=2))  # rank 0 may generate data for a while
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _barrier():
    if torch.distributed.get_backend() == "nccl":  # name the GPU, or NCCL guesses one per rank
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- config checks


def exit_layers_of(cfg, num_layers: int) -> list[int]:
    layers = cfg.exit_layers if cfg.exit_layers is not None else [cfg.exit_layer]
    if isinstance(layers, (int, str)):
        layers = [layers]
    try:
        layers = sorted({int(x) for x in layers})
    except (TypeError, ValueError):
        raise UserError(f"exit_layers={list(layers)} must be integers, e.g. exit_layers=[4,8,12]") from None
    if not layers:
        raise UserError("exit_layers is empty: give at least one layer, e.g. exit_layers=[8]")
    bad = [e for e in layers if not 1 <= e <= num_layers - 1]
    if bad:
        raise UserError(f"exit layer {bad[0]} is outside 1..{num_layers - 1} for this {num_layers}-layer base")
    return layers


def check_out_dir(out_dir: str) -> Path:
    """out_dir must be (or become) a writable folder; found now rather than at the first checkpoint."""
    path = Path(out_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"out_dir={out_dir} is not a writable folder ({e.strerror or type(e).__name__}): "
                        "pass out_dir=<a folder you can write>") from None
    return path


# ---------------------------------------------------------------- checkpoints: what they hold, and resume guards

RUN_FILE = "run.json"          # the configuration a checkpoint belongs to
HEADS_FILE = "heads.safetensors"  # the heads' weights, readable without pickle
_STEP_DIR = re.compile(r"^step_\d{7}$")


def run_identity(cfg, exit_layers: list[int], base_model: str) -> dict:
    """What a checkpoint must share with the run that resumes it (anything else may change between them)."""
    return {"exit_layers": list(exit_layers), "head_type": str(cfg.head.type), "mlp_hidden": int(cfg.head.mlp_hidden),
            "base_model": base_model}


def resume_folder(out_dir: Path, identity: dict) -> Path:
    """The checkpoint `checkpoints/latest` names, checked to be this run's and inside its folder."""
    root = out_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        raise UserError(f"resume=true but {root} holds no checkpoint: pass out_dir=<the folder of the run to resume>")
    name = latest.read_text().strip()
    if not _STEP_DIR.match(name):  # never follow an absolute path or `..` out of the run's folder
        raise UserError(f"{latest} names '{name[:80]}', not a checkpoint folder (step_NNNNNNN): the file was edited or "
                        "damaged; write the name of a folder under checkpoints/ into it, or start a new out_dir")
    folder = root / name
    if not (folder / "state").is_dir():
        raise UserError(f"{latest} names {name}, which is missing or incomplete: write the name of an existing "
                        "checkpoint folder into it, or start a new out_dir")
    saved_file = folder / RUN_FILE
    if saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{saved_file} is not readable JSON: the checkpoint is damaged; start a new out_dir") from None
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in identity.items() if saved.get(k) != v]
        if changed:
            raise UserError(f"resume=true but the checkpoint in {out_dir} belongs to another configuration "
                            f"({'; '.join(changed)}): resume with its settings, or pass a new out_dir")
    else:
        print(f"warning: {folder} records no configuration (written by an older ppsd): resuming unchecked", flush=True)
    check_checkpoint_pickles(folder)
    return folder


def _deepspeed_safe_globals() -> list:
    """The classes a DeepSpeed checkpoint of these heads pickles besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_pickles(folder: Path) -> None:
    """DeepSpeed loads its files with an unrestricted torch.load; first prove each unpickles with nothing but
    tensors, plain containers and DeepSpeed's own state classes (torch's weights_only unpickler), so a
    planted object that would run code on load is refused instead."""
    for file in sorted((folder / "state").glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001: any failure means "do not hand this to a full unpickler"
            why = next((l.strip() for l in str(e).splitlines() if "Unsupported global" in l), type(e).__name__)
            raise UserError(f"{file} holds more than checkpoint state ({why[:160]}): it was not written by this "
                            "trainer or is damaged; resume only checkpoints you wrote, or start a new out_dir") from None


def check_heads_match(engine, folder: Path) -> None:
    """After DeepSpeed's load: the heads' weights must equal the safetensors copy saved beside them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / HEADS_FILE
    if not file.is_file():
        return  # an older checkpoint: DeepSpeed's own files are all there is
    try:
        saved = load_file(file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} cannot be read ({str(e).splitlines()[0]}): the checkpoint is damaged; "
                        "start a new out_dir") from None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = engine.module.state_dict()
        bad = sorted(k for k in state.keys() | saved.keys()
                     if k not in saved or k not in state or not torch.equal(saved[k].to(state[k]), state[k]))
    if bad:
        raise UserError(f"the checkpoint in {folder} holds heads that differ from its {HEADS_FILE} ({bad[0]}): "
                        "it is damaged or was altered; start a new out_dir")


# ---------------------------------------------------------------- the shared base forward


def matmul_dtype(base, dtype) -> torch.dtype:
    """The torch dtype a `matmul_dtype` setting names (None / "null": the base's own)."""
    return getattr(torch, str(dtype)) if dtype not in (None, "null", "None") else base.dtype


def autocast(base, dtype):
    """Run the frozen base's matmuls in `dtype` (None / the base dtype: no autocast)."""
    dtype = matmul_dtype(base, dtype)
    return torch.autocast(base.device.type, dtype=dtype, enabled=dtype != base.dtype)


class FeatureSource:
    """Hidden states after every exit layer and after the last layer, from one frozen-base forward.

    With `keep=True` each example's states are computed once and reused across epochs.
    """

    def __init__(self, base, exit_layers: list[int], keep: bool, batch_size: int, autocast_dtype=None):
        self.base, self.exit_layers, self.keep, self.batch_size = base, exit_layers, keep, batch_size
        self.autocast_dtype = autocast_dtype
        self.store: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    @torch.no_grad()
    def _forward(self, examples: list[D.Example]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        base = self.base
        batch = D.pad_batch(examples, pad_id=0)
        ids, mask = batch["input_ids"].to(base.device), batch["attention_mask"].to(base.device)
        pos = torch.arange(ids.shape[1], device=base.device)[None].expand_as(ids)
        h, taps, start = base.embed(ids), [], 0
        with autocast(base, self.autocast_dtype):
            for end in self.exit_layers + [base.num_layers]:
                h = base.run_layers(h, start, end, position_ids=pos, attention_mask=mask)
                taps.append(h.to(base.dtype))  # stored in the base dtype: the head trains in it
                start = end
        out = []
        for i, e in enumerate(examples):
            n, lp = len(e.input_ids), e.loss_positions
            out.append(([t[i, :n].clone() for t in taps[:-1]], taps[-1][i, lp.start:lp.stop].clone()))
        return out

    def precompute(self, examples: list[tuple[int, D.Example]], progress: bool) -> None:
        todo = sorted((x for x in examples if x[0] not in self.store), key=lambda x: len(x[1].input_ids))
        bar = tqdm(total=sum(len(e.input_ids) for _, e in todo), desc="frozen-base forward", unit="tok",
                   disable=not progress or not todo, dynamic_ncols=True)
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b:b + self.batch_size]
            for (key, e), feats in zip(chunk, self._forward([e for _, e in chunk])):
                self.store[key] = feats
            bar.update(sum(len(e.input_ids) for _, e in chunk))
        bar.close()

    def get(self, keyed: list[tuple[int, D.Example]]):
        if self.keep:
            self.precompute(keyed, progress=False)
            return [self.store[k] for k, _ in keyed]
        return self._forward([e for _, e in keyed])


def collate(base, keyed, feats, exit_layers):
    """Right-pad the exit-layer states; flatten the loss positions' final states (teacher input)."""
    examples = [e for _, e in keyed]
    width = max(len(e.input_ids) for e in examples)
    hidden = {}
    for j, layer in enumerate(exit_layers):
        h = torch.zeros(len(examples), width, base.hidden_size, dtype=base.dtype, device=base.device)
        for i, (states, _) in enumerate(feats):
            h[i, :states[j].shape[0]] = states[j]
        hidden[layer] = h
    batch = D.pad_batch(examples, pad_id=0)
    return {"hidden": hidden, "final": torch.cat([f for _, f in feats]),
            "attention_mask": batch["attention_mask"].to(base.device), "loss_mask": batch["loss_mask"].to(base.device)}


# ---------------------------------------------------------------- the heads being trained


class HeadSet(nn.Module):
    """Every head of the job; forward = per-head student logits at the loss positions + the teacher's."""

    def __init__(self, base, head_type: str, exit_layers: list[int], mlp_hidden: int, lm_head_dtype=None):
        super().__init__()
        self.heads = nn.ModuleDict({f"L{e}": build_head(base, head_type, e, mlp_hidden=mlp_hidden) for e in exit_layers})
        self.base = [base]  # a list keeps the frozen base out of this module's parameters and checkpoints
        self.lm_head_dtype = lm_head_dtype  # matmul dtype of the frozen LM head; evaluation sets None (exact)
        self.cast_lm_head: dict = {}  # dtype -> (weight, bias) of the frozen LM head in that dtype

    def logits(self, hidden):
        """Final norm + LM head, the matmul in `lm_head_dtype` through one kept copy of the frozen LM head:
        autocast would cast the vocab-wide matrix again on every call (it caches casts of trainable leaves only)."""
        base = self.base[0]
        dtype = matmul_dtype(base, self.lm_head_dtype)
        if dtype == base.dtype:
            return base.logits(hidden)
        head = base.model.lm_head
        if dtype not in self.cast_lm_head:
            self.cast_lm_head[dtype] = (head.weight.detach().to(dtype),
                                        None if head.bias is None else head.bias.detach().to(dtype))
        weight, bias = self.cast_lm_head[dtype]
        return F.linear(base.decoder.norm(hidden).to(dtype), weight, bias)

    def forward(self, batch):
        base = self.base[0]
        mask = batch["loss_mask"]
        with torch.no_grad():
            teacher = self.logits(batch["final"])
        students = {}
        for name, head in self.heads.items():
            h = batch["hidden"][int(name[1:])]
            if head.head_type == "mlp":  # position-wise: only the loss positions need it
                out = head(h[mask])
            else:
                pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
                masks = base.attention_masks(h, pos, attention_mask=batch["attention_mask"])
                out = head(h, position_embeddings=base.position_embeddings(h, pos), position_ids=pos,
                           attention_mask=masks.get(getattr(head.layer, "attention_type", "full_attention"),
                                                    masks["full_attention"]))[mask]
            students[name] = self.logits(out)
        return students, teacher


def warm_start(model: HeadSet, folder: str, base) -> None:
    """Start from a trained head folder (it must fit this base, exit layer and head type)."""
    head = load_head(folder, base)
    name = f"L{head.exit_layer}"
    mine = model.heads[next(iter(model.heads))]
    if name not in model.heads or head.head_type != mine.head_type or \
            (head.head_type == "mlp" and head.up.out_features != mine.up.out_features):
        raise UserError(f"init_from={folder} is a {head.describe()}, but this job trains {mine.head_type} heads "
                        f"at layers {[int(n[1:]) for n in model.heads]}: match exit_layer, head and head.mlp_hidden")
    model.heads[name].load_state_dict(head.state_dict())


def lr_lambda(total_steps: int, warmup: float, min_ratio: float):
    warm = max(1, round(warmup * total_steps))

    def f(step):  # linear warm-up then cosine to min_ratio
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ---------------------------------------------------------------- bookkeeping


def _wandb_run(cfg, out_dir: Path, resolved: dict):
    if not cfg.wandb.enabled:
        return None
    import wandb

    mode = cfg.wandb.mode or os.environ.get("WANDB_MODE")
    if not mode:
        netrc = Path.home() / ".netrc"
        has_key = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        mode = "online" if has_key else "offline"
    if mode == "disabled":
        return None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name, mode=mode,
                      dir=str(out_dir), config=resolved, id=run_id, resume="allow")


def _metrics_lines_upto(path: Path, step: int) -> None:
    """After a resume, drop the log lines of steps the checkpoint does not contain (they will be redone)."""
    if path.exists():
        keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        atomic_write_text(path, "".join(l + "\n" for l in keep))


def save_checkpoint(engine, ckpt_root: Path, step: int, rank: int, identity: dict) -> None:
    """DeepSpeed state (weights, optimizer, scheduler), the heads as safetensors and the run's identity into a
    temp folder, renamed into place when complete."""
    from safetensors.torch import save_file

    tmp = ckpt_root / f".tmp-step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag="state", client_state={"step": step}, save_latest=False)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # every rank: it is a collective
        heads = {k: v.detach().cpu().contiguous().clone() for k, v in engine.module.state_dict().items()}
    _barrier()
    if rank == 0:
        save_file(heads, tmp / HEADS_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(identity))
        final = ckpt_root / f"step_{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / "latest", final.name)
        for old in ckpt_root.glob("step_*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: HeadSet, base, source: FeatureSource, keyed, exit_layers, batch_size: int) -> dict:
    """Position-weighted held-out top-1 agreement, expected acceptance and loss per head."""
    sums = torch.zeros(len(exit_layers), 2, dtype=torch.float64, device=base.device)  # on the device: no sync per batch
    positions = 0
    lm_head_dtype, model.lm_head_dtype = model.lm_head_dtype, None  # the exact teacher, whatever trained
    for b in range(0, len(keyed), batch_size):
        chunk = keyed[b:b + batch_size]
        batch = collate(base, chunk, source.get(chunk), exit_layers)
        students, teacher = model(batch)
        n = teacher.shape[0]
        sums += head_metrics(students, TeacherView(teacher))[:, 1:] * n
        positions += n
    model.lm_head_dtype = lm_head_dtype
    means = (sums / max(1, positions)).tolist()
    return {name: {"top1": m[0], "expected_acceptance": m[1], "positions": positions}
            for name, m in zip(model.heads, means)}


def head_metrics(students: dict, teacher: TeacherView, losses: dict | None = None) -> torch.Tensor:
    """(heads, 3) [loss, top-1 agreement, expected acceptance] on the heads' device: a step's metrics stay
    there until one reduction and one read (a value read per metric would wait for the GPU each time)."""
    rows = []
    for name, s in students.items():
        loss = losses[name].detach().float() if losses else torch.zeros((), device=s.device)
        rows.append(torch.stack([loss, top1_agreement(s, teacher), expected_acceptance(s, teacher)]))
    return torch.stack(rows).double()


def reduce_mean(stats: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over ranks, in place on the tensor's own device (NCCL takes GPU tensors only)."""
    if world > 1:
        torch.distributed.all_reduce(stats)
        stats /= world
    return stats


# ---------------------------------------------------------------- the job


def train(cfg) -> dict:
    t_start = time.time()
    # Bad input fails here, before any weights load or the slow distributed set-up.
    validate(cfg, TRAIN)
    device = train_device(cfg.device)
    exit_layers = exit_layers_of(cfg, model_num_layers(cfg.model, cfg.trust_remote_code))
    out_dir = check_out_dir(cfg.out_dir)
    identity = run_identity(cfg, exit_layers, model_source_id(resolve_model_path(cfg.model), cfg.model))
    resume_from = resume_folder(out_dir, identity) if cfg.resume else None
    quiet = int(os.environ.get("RANK", 0)) != 0
    cfg.dtype = resolve_dtype(cfg.dtype, device, quiet=quiet)
    cfg.matmul_dtype = resolve_dtype(cfg.matmul_dtype, device, name="matmul_dtype", quiet=quiet)
    cfg.data.gen_dtype = resolve_dtype(cfg.data.gen_dtype, device, name="data.gen_dtype", quiet=quiet)
    cfg.data.samples = D.sampled_answers(cfg.data.samples, device, quiet=quiet)
    base = load_base(cfg.model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    cfg.data.gen_batch_size = D.generation_batch_size(base, cfg.data)
    if is_auto(cfg.forward_batch_size):  # the frozen forward keeps no graph: a GPU takes far more rows
        cfg.forward_batch_size = 64 if device.type == "cuda" else 16
    head_type = cfg.head.type
    prompts = D.load_prompts(cfg.data.prompts, split=cfg.data.prompt_split, field=cfg.data.prompt_field,
                             limit=cfg.data.max_prompts)

    import deepspeed

    rank, world = init_distributed(device, cfg.threads)
    main = rank == 0
    torch.manual_seed(cfg.seed)
    out_dir = Path(_broadcast(str(out_dir.resolve())))  # ranks' Hydra folders may differ by a second
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"

    # data: prompts -> cached self-generated responses -> examples (held-out prompts: greedy answers only)
    gen_base = base if str(cfg.data.gen_dtype) in (str(cfg.dtype), "null", "None") else \
        load_base(cfg.model, dtype=cfg.data.gen_dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    t_gen = time.time()
    rows, data_dir = D.self_distillation_set(base, prompts, cfg.data, cache_dir=cfg.data.cache_dir, rank=rank,
                                             world=world, barrier=_barrier, progress=main, gen_base=gen_base)
    gen_seconds = time.time() - t_gen
    del gen_base
    held = D.heldout_ids(prompts, cfg.data.heldout_fraction, cfg.seed)
    examples = D.to_examples(rows)
    train_set = [(i, e) for i, e in enumerate(examples) if e.prompt_id not in held]
    if cfg.data.prompt_positions:  # held-out metrics stay on the responses: what the decoder drafts
        train_set = list(zip([i for i, _ in train_set], D.with_prompt_positions([e for _, e in train_set])))
    eval_set = [(i, e) for i, e in enumerate(examples) if e.prompt_id in held and not e.sampled]
    if not train_set:
        raise UserError("no training examples: give more prompts or lower data.heldout_fraction")
    shard = train_set[rank::world]
    per_rank = len(train_set) // world
    bs = min(cfg.batch_size, per_rank) or 1
    steps_per_epoch = max(1, per_rank // bs)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # model + DeepSpeed engine (only the heads are trainable; the base stays outside the engine)
    model = HeadSet(base, head_type, exit_layers, cfg.head.mlp_hidden, lm_head_dtype=cfg.matmul_dtype)
    if cfg.init_from:
        warm_start(model, cfg.init_from, base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.head.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup, cfg.min_lr_ratio))
    ds_config = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    ds_config.update(train_micro_batch_size_per_gpu=bs, gradient_accumulation_steps=1,
                     gradient_clipping=cfg.grad_clip, steps_per_print=10**9, wall_clock_breakdown=False)
    ds_config["bf16"] = {"enabled": base.dtype == torch.bfloat16}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    step = 0
    if resume_from is not None:
        # DeepSpeed reads its optimizer and scheduler state with torch.load (a pickle: README, "Resuming");
        # the heads' weights are then checked against the safetensors copy beside them.
        _, client = engine.load_checkpoint(str(resume_from), tag="state")
        check_heads_match(engine, resume_from)
        step = client["step"]
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        if cfg.resume:
            _metrics_lines_upto(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run = _wandb_run(cfg, out_dir, resolved) if main else None

    source = FeatureSource(base, exit_layers, keep=cfg.cache_features, batch_size=cfg.forward_batch_size,
                           autocast_dtype=cfg.matmul_dtype)
    eval_source = FeatureSource(base, exit_layers, keep=True, batch_size=cfg.forward_batch_size)  # exact fp32 states
    t_features = time.time()
    if cfg.cache_features:
        source.precompute(shard, progress=main)
    if main:
        eval_source.precompute(eval_set, progress=True)
    untrained = evaluate(model, base, eval_source, eval_set, exit_layers, cfg.forward_batch_size) if main and eval_set \
        and step == 0 else None

    def batch_at(s: int):
        epoch, idx = divmod(s, steps_per_epoch)
        order = list(range(len(shard)))
        random.Random(cfg.seed * 100003 + epoch * 7919 + rank).shuffle(order)
        return epoch, [shard[j] for j in order[idx * bs:(idx + 1) * bs]]

    t_train = time.time()
    features_seconds = t_train - t_features
    bar = tqdm(total=total_steps, initial=step, desc=f"train {head_type} L{','.join(map(str, exit_layers))}",
               unit="step", disable=not main, dynamic_ncols=True)
    engine.train()
    while step < total_steps:
        epoch, keyed = batch_at(step)
        batch = collate(base, keyed, source.get(keyed), exit_layers)
        students, teacher = engine(batch)
        teacher = TeacherView(teacher.detach())  # argmax and probabilities once per step, whatever the head count
        losses = {n: distill_loss(s, teacher, cfg.loss, cfg.temperature, cfg.ce_weight) for n, s in students.items()}
        loss = sum(losses.values())
        engine.backward(loss)
        engine.step()
        step += 1
        stats = reduce_mean(head_metrics(students, teacher, losses), world).tolist()  # the step's one host read
        if main:
            record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                      "loss": sum(r[0] for r in stats), "top1": sum(r[1] for r in stats) / len(stats),
                      "expected_acceptance": sum(r[2] for r in stats) / len(stats)}
            if len(exit_layers) > 1:
                for n, row in zip(students, stats):
                    record |= {f"{n}/loss": row[0], f"{n}/top1": row[1], f"{n}/expected_acceptance": row[2]}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if run:
                run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.3f}",
                            acc=f"{record['expected_acceptance']:.3f}")
            bar.update(1)
        if cfg.debug.step_sleep:
            time.sleep(cfg.debug.step_sleep)  # lets the resume test kill a run mid-way
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save_checkpoint(engine, ckpt_root, step, rank, identity)
    bar.close()
    train_seconds = time.time() - t_train

    # Full weights on every rank (ZeRO-3 partitions them; ZeRO-1/2 make them views of one flat buffer),
    # loaded into plain heads for the held-out evaluation and the head folders.
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    result = None
    if main:
        model = HeadSet(base, head_type, exit_layers, cfg.head.mlp_hidden)
        model.load_state_dict(state)
        model.eval()
        heldout = evaluate(model, base, eval_source, eval_set, exit_layers, cfg.forward_batch_size) if eval_set else {}
        per_head = []
        for e in exit_layers:
            name = f"L{e}"
            head = model.heads[name]
            metrics = heldout.get(name, {})
            metadata = {
                "training": {"data": {"prompts": str(cfg.data.prompts), "num_prompts": len(prompts),
                                      "examples": len(train_set), "cache": str(data_dir),
                                      "generation": D._gen_settings(cfg.data)},
                             "loss": cfg.loss, "temperature": cfg.temperature, "ce_weight": cfg.ce_weight,
                             "lr": cfg.head.lr, "steps": step, "matmul_dtype": str(cfg.matmul_dtype),
                             "batch_size": bs * world, "epochs": cfg.epochs, "dtype": str(cfg.dtype), "seed": cfg.seed},
                "heldout": {"top1": metrics.get("top1"), "expected_acceptance": metrics.get("expected_acceptance"),
                            "positions": metrics.get("positions"),
                            "untrained_top1": (untrained or {}).get(name, {}).get("top1")},
            }
            head.metadata = metadata
            head._hub_mixin_config["metadata"] = metadata  # what save_pretrained writes to config.json
            folder = out_dir / f"head_L{e}_{head_type}"
            with atomic_folder(folder) as tmp:
                head.save_pretrained(tmp)
            per_head.append({"exit_layer": e, "head_path": str(folder), "heldout_top1": metrics.get("top1"),
                             "heldout_expected_acceptance": metrics.get("expected_acceptance"),
                             "heldout_top1_untrained": (untrained or {}).get(name, {}).get("top1")})
        result = {"head": head_type, "model": base.name, "steps": step, "train_examples": len(train_set),
                  "heldout_positions": next(iter(heldout.values()), {}).get("positions", 0),
                  "generate_seconds": round(gen_seconds, 1), "base_forward_seconds": round(features_seconds, 1),
                  "train_seconds": round(train_seconds, 1),
                  "total_seconds": round(time.time() - t_start, 1), "out_dir": str(out_dir),
                  "device": str(device), "dtype": str(cfg.dtype), "matmul_dtype": str(cfg.matmul_dtype),
                  "gen_dtype": str(cfg.data.gen_dtype), "threads": torch.get_num_threads()}
        if len(per_head) == 1:
            h = per_head[0]
            result = {"head_path": h["head_path"], "exit_layer": h["exit_layer"], "heldout_top1": h["heldout_top1"],
                      "heldout_expected_acceptance": h["heldout_expected_acceptance"],
                      "heldout_top1_untrained": h["heldout_top1_untrained"]} | result
        else:
            result = {"head_paths": [h["head_path"] for h in per_head], "exit_layers": exit_layers,
                      "heldout_top1": [h["heldout_top1"] for h in per_head],
                      "heldout_expected_acceptance": [h["heldout_expected_acceptance"] for h in per_head],
                      "heads": per_head} | result
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
        if run:
            run.summary.update({f"heldout/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
            for h in per_head:
                run.summary.update({f"heldout/L{h['exit_layer']}/top1": h["heldout_top1"],
                                    f"heldout/L{h['exit_layer']}/expected_acceptance": h["heldout_expected_acceptance"]})
            run.finish()
    _barrier()
    return result
