"""The training recipe: freeze the base, self-distil one exit head per requested layer with DeepSpeed.

`run(cfg)` is the whole job, as `python -m train` runs it:

    recipe = DistillRecipe(cfg)  # the config checked: bad input fails before any weights load
    recipe.setup()               # base, process group, data, engine (resumed if asked), log, features
    recipe.train()               # the loop: batch, loss, backward, step, log, checkpoint
    result = recipe.save_heads() # held-out metrics, a head folder per layer, metrics.json (rank 0)
    recipe.cleanup()

What the heads train on is in train/features.py, the heads and their metrics in train/head_set.py,
checkpoints and the resume guards in train/checkpoint.py, the process group in train/distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from heads import UserError, load_base
from heads.base import model_num_layers, model_source_id, resolve_model_path
from heads.files import atomic_folder, atomic_write_text, run_folder
from heads.hardware import is_auto, resolve_compile, resolve_dtype
from heads.schema import TrainConfig
from train import data as D
from train.checkpoint import (check_heads_match, check_run_folders, metrics_lines_upto, resume_folder,
                              run_identity, save_checkpoint)
from train.distributed import barrier, broadcast, init_distributed, reduce_mean, train_device
from train.features import FeatureSource, collate
from train.head_set import HeadSet, evaluate_by_source, head_metrics, warm_start
from train.losses import TeacherView, distill_loss
from train.run_log import append_jsonl, wandb_run


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


# ---------------------------------------------------------------- schedule and logging


def lr_lambda(total_steps: int, warmup: float, min_ratio: float):
    warm = max(1, round(warmup * total_steps))

    def f(step):  # linear warm-up then cosine to min_ratio
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ---------------------------------------------------------------- the recipe


def run(cfg: TrainConfig) -> dict | None:
    """The whole job; its result (what metrics.json holds) on rank 0, None on the other ranks. `cfg`: the
    checked options (`heads.config.validate(dictconfig, TrainConfig)`, as the entry point passes them)."""
    recipe = DistillRecipe(cfg)
    # The run owns out_dir (rank 0 holds it for all ranks): a second run into it refuses.
    with run_folder(recipe.out_dir, "python -m train") if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        recipe.setup()
        recipe.train()
        result = recipe.save_heads()
        recipe.cleanup()
    return result


class DistillRecipe:
    """Every rank runs the same recipe; rank 0 (`main`) alone writes the log, the head folders and metrics.json.

    One frozen-base forward per batch serves every head (train/features.py); only the heads are in the DeepSpeed
    engine, the base stays outside it.

    `cfg` holds the options as given (`auto` included); what `auto` became is decided once, in `setup`, and kept
    beside it: `self.dtype`, `self.matmul_dtype`, `self.forward_batch_size` and `self.data` (the data options
    with their `auto`s resolved)."""

    def __init__(self, cfg: TrainConfig):
        # Bad input fails here, before any weights load or the slow distributed set-up.
        self.t_start = time.time()
        self.cfg = cfg
        self.device = train_device(cfg.device)
        self.exit_layers = exit_layers_of(cfg, model_num_layers(cfg.model, cfg.trust_remote_code))
        self.out_dir = check_run_folders(cfg, self.exit_layers)  # out_dir, the data cache, DeepSpeed's build folder
        self.identity = run_identity(cfg, self.exit_layers, model_source_id(resolve_model_path(cfg.model), cfg.model))
        self.resume_from = resume_folder(self.out_dir, self.identity) if cfg.resume else None

    def setup(self) -> None:
        cfg, device = self.cfg, self.device
        quiet = int(os.environ.get("RANK", 0)) != 0
        self.dtype = resolve_dtype(cfg.dtype, device, quiet=quiet)
        self.matmul_dtype = resolve_dtype(cfg.matmul_dtype, device, name="matmul_dtype", quiet=quiet)
        data = {"gen_dtype": resolve_dtype(cfg.data.gen_dtype, device, name="data.gen_dtype", quiet=quiet),
                "samples": D.sampled_answers(cfg.data.samples, device, quiet=quiet),
                "gen_compile": resolve_compile(cfg.data.gen_compile, device, quiet=quiet)}
        self.base = load_base(cfg.model, dtype=self.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
        self.data = cfg.data.model_copy(update=data | {"gen_batch_size": D.generation_batch_size(self.base, cfg.data)})
        # the frozen forward keeps no graph: a GPU takes far more rows
        self.forward_batch_size = (64 if device.type == "cuda" else 16) if is_auto(cfg.forward_batch_size) \
            else cfg.forward_batch_size
        self.prompts = D.load_prompts(cfg.data.prompts, split=cfg.data.prompt_split, field=cfg.data.prompt_field,
                                      limit=cfg.data.max_prompts)

        self.rank, self.world = init_distributed(device, cfg.threads)
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        self.out_dir = Path(broadcast(str(self.out_dir.resolve())))  # ranks' Hydra folders may differ by a second
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup_data()
        self._setup_engine()
        self._setup_log()
        self._setup_features()

    def _setup_data(self) -> None:
        """Prompts -> cached self-generated responses -> examples (held-out prompts: greedy answers only),
        this rank's shard of the training set, and the step counts."""
        cfg, base, data = self.cfg, self.base, self.data
        gen_base = base if str(data.gen_dtype) in (str(self.dtype), "null", "None") else \
            load_base(cfg.model, dtype=data.gen_dtype, device=self.device, trust_remote_code=cfg.trust_remote_code)
        gen_base.set_runtime(compile=data.gen_compile)
        t_gen = time.time()
        rows, self.data_dirs = D.self_distillation_set(base, self.prompts, data, cache_dir=data.cache_dir,
                                                      rank=self.rank, world=self.world, barrier=barrier,
                                                      progress=self.main, gen_base=gen_base)
        self.gen_seconds = time.time() - t_gen
        base.set_runtime()  # training runs the layers without a cache
        del gen_base
        held = D.heldout_ids(self.prompts, cfg.data.heldout_fraction, cfg.seed)
        examples = D.to_examples(rows)
        train_set = [(i, e) for i, e in enumerate(examples) if e.prompt_id not in held]
        if cfg.data.prompt_positions:  # held-out metrics stay on the responses: what the decoder drafts
            train_set = list(zip([i for i, _ in train_set], D.with_prompt_positions([e for _, e in train_set])))
        self.eval_set = [(i, e) for i, e in enumerate(examples) if e.prompt_id in held and not e.sampled]
        if not train_set:
            raise UserError("no training examples: give more prompts or lower data.heldout_fraction")
        self.train_set, self.shard = train_set, train_set[self.rank::self.world]
        per_rank = len(train_set) // self.world
        self.batch_size = min(cfg.batch_size, per_rank) or 1
        self.steps_per_epoch = max(1, per_rank // self.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    def _setup_engine(self) -> None:
        """The heads (warm-started if asked), AdamW with warm-up + cosine, the DeepSpeed engine around them;
        the checkpoint's state loaded into it on a resume."""
        import deepspeed

        cfg, base = self.cfg, self.base
        self.model = model = HeadSet(base, cfg.head.type, self.exit_layers, cfg.head.mlp_hidden,
                                     lm_head_dtype=self.matmul_dtype, mlp_layers=cfg.head.mlp_layers)
        if cfg.init_from:
            warm_start(model, cfg.init_from, base)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.head.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, cfg.warmup, cfg.min_lr_ratio))
        ds_config = cfg.deepspeed.model_dump()
        ds_config.update(train_micro_batch_size_per_gpu=self.batch_size, gradient_accumulation_steps=1,
                         gradient_clipping=cfg.grad_clip, steps_per_print=10**9, wall_clock_breakdown=False)
        ds_config["bf16"] = {"enabled": base.dtype == torch.bfloat16}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=ds_config)
        self.step = 0
        if self.resume_from is not None:
            # DeepSpeed reads its optimizer and scheduler state with torch.load (a pickle: README, "Resuming");
            # the heads' weights are then checked against the safetensors copy beside them.
            _, client = self.engine.load_checkpoint(str(self.resume_from), tag="state")
            check_heads_match(self.engine, self.resume_from)
            self.step = client["step"]

    def _setup_log(self) -> None:
        """metrics.jsonl (on a resume: cut back to the checkpoint's step) and the W&B run, on rank 0."""
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if self.main:
            if self.cfg.resume:
                metrics_lines_upto(self.metrics_path, self.step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
        resolved = self.cfg.model_dump() | {"dtype": self.dtype, "matmul_dtype": self.matmul_dtype,
                                            "forward_batch_size": self.forward_batch_size, "data": self.data.model_dump()}
        self.run = wandb_run(self.cfg, self.out_dir, resolved) if self.main else None

    def _setup_features(self) -> None:
        """The frozen base's states for this rank's shard (kept if `cache_features`) and, on rank 0, the held-out
        set's exact fp32 states and the untrained heads' held-out metrics."""
        cfg, base = self.cfg, self.base
        self.source = FeatureSource(base, self.exit_layers, keep=cfg.cache_features,
                                    batch_size=self.forward_batch_size, autocast_dtype=self.matmul_dtype)
        self.eval_source = FeatureSource(base, self.exit_layers, keep=True, batch_size=self.forward_batch_size)
        self.t_features = time.time()
        if cfg.cache_features:
            self.source.precompute(self.shard, progress=self.main)
        if self.main:
            self.eval_source.precompute(self.eval_set, progress=True)
        self.untrained = self._evaluate(self.model)[0] if self.main and self.eval_set and self.step == 0 else None

    def _evaluate(self, model: HeadSet) -> tuple[dict, dict]:
        """The held-out metrics per head, and per prompt source and head when there are several sources."""
        return evaluate_by_source(model, self.base, self.eval_source, self.eval_set, self.exit_layers,
                                  self.forward_batch_size, {p["id"]: p.get("source") for p in self.prompts})

    def _batch_at(self, step: int):
        """The epoch and this rank's batch at `step`: a fixed shuffle per (seed, epoch, rank), so a resumed run
        sees the batches the uninterrupted one would have."""
        epoch, idx = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.shard)))
        random.Random(self.cfg.seed * 100003 + epoch * 7919 + self.rank).shuffle(order)
        return epoch, [self.shard[j] for j in order[idx * self.batch_size:(idx + 1) * self.batch_size]]

    def train(self) -> None:
        """One step per batch: the heads' loss against the teacher, backward, optimizer step, a log line, and a
        checkpoint every `checkpoint_every` steps and at the last."""
        cfg, engine, step = self.cfg, self.engine, self.step
        t_train = time.time()
        self.features_seconds = t_train - self.t_features
        bar = tqdm(total=self.total_steps, initial=step, unit="step", disable=not self.main, dynamic_ncols=True,
                   desc=f"train {cfg.head.type} L{','.join(map(str, self.exit_layers))}")
        engine.train()
        while step < self.total_steps:
            epoch, keyed = self._batch_at(step)
            batch = collate(self.base, keyed, self.source.get(keyed), self.exit_layers)
            students, teacher = engine(batch)
            teacher = TeacherView(teacher.detach())  # argmax and probabilities once per step, whatever the head count
            losses = {n: distill_loss(s, teacher, cfg.loss, cfg.temperature, cfg.ce_weight, cfg.top_k)
                      for n, s in students.items()}
            loss = sum(losses.values())
            engine.backward(loss)
            engine.step()
            step += 1
            stats = reduce_mean(head_metrics(students, teacher, losses), self.world).tolist()  # the step's one host read
            if self.main:
                self.log_step(step, epoch, list(students), stats, bar)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                t_train += self.log_heldout(step, time.time() - t_train)  # evaluation time is not training time
            if step % cfg.checkpoint_every == 0 or step == self.total_steps:
                save_checkpoint(engine, self.ckpt_root, step, self.rank, self.identity)
        bar.close()
        self.step = step
        self.train_seconds = time.time() - t_train

    def log_heldout(self, step: int, train_seconds: float) -> float:
        """Score the heads on the held-out set now (a metrics.jsonl line per call); returns the seconds it took."""
        import deepspeed

        t0 = time.time()
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):  # every rank enters (ZeRO-3)
            if self.main and self.eval_set:
                module.eval()
                heldout, by_source = self._evaluate(module)
                module.train()
                record = {"step": step, "train_seconds": round(train_seconds, 1)}
                record |= {f"heldout/{name}/{k}": v for name, m in heldout.items()
                           for k, v in m.items() if k != "positions"}
                record |= {f"heldout/{name}/top1/{source}": m["top1"] for source, per_head in by_source.items()
                           for name, m in per_head.items()}
                append_jsonl(self.metrics_path, record)
                if self.run:
                    self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        barrier()
        return time.time() - t0

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def log_step(self, step: int, epoch: int, names: list[str], stats: list[list[float]], bar) -> None:
        """One line of metrics.jsonl (and W&B, and the progress bar): the heads' summed loss and mean top-1 and
        acceptance, and with several heads each head's own."""
        record = {"step": step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                  "loss": sum(r[0] for r in stats), "top1": sum(r[1] for r in stats) / len(stats),
                  "expected_acceptance": sum(r[2] for r in stats) / len(stats)}
        if len(self.exit_layers) > 1:
            for n, row in zip(names, stats):
                record |= {f"{n}/loss": row[0], f"{n}/top1": row[1], f"{n}/expected_acceptance": row[2]}
        append_jsonl(self.metrics_path, record)
        if self.run:
            self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.3f}",
                        acc=f"{record['expected_acceptance']:.3f}")
        bar.update(1)

    def save_heads(self) -> dict | None:
        """The trained heads' held-out metrics, a head folder per exit layer and metrics.json; the result on
        rank 0, None on the other ranks."""
        import deepspeed

        # Full weights on every rank (ZeRO-3 partitions them; ZeRO-1/2 make them views of one flat buffer),
        # loaded into plain heads for the held-out evaluation and the head folders.
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            state = {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        if not self.main:
            return None
        cfg = self.cfg
        model = HeadSet(self.base, cfg.head.type, self.exit_layers, cfg.head.mlp_hidden, mlp_layers=cfg.head.mlp_layers)
        model.load_state_dict(state)
        model.eval()
        heldout, by_source = self._evaluate(model) if self.eval_set else ({}, {})
        per_head = [self._save_head(model.heads[f"L{e}"], e, heldout.get(f"L{e}", {}),
                                    {s: m[f"L{e}"]["top1"] for s, m in by_source.items()})
                    for e in self.exit_layers]
        result = self._result(per_head, heldout)
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(result, indent=2))
        if self.run:
            self.run.summary.update({f"heldout/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
            for h in per_head:
                self.run.summary.update({f"heldout/L{h['exit_layer']}/top1": h["heldout_top1"],
                                         f"heldout/L{h['exit_layer']}/expected_acceptance":
                                             h["heldout_expected_acceptance"]})
        return result

    def _save_head(self, head, exit_layer: int, metrics: dict, top1_by_source: dict) -> dict:
        """The head's folder, its training settings and held-out metrics in its config; its line of the result."""
        cfg = self.cfg
        untrained = (self.untrained or {}).get(f"L{exit_layer}", {}).get("top1")
        metadata = {
            "training": {"data": {"prompts": D.source_names(cfg.data.prompts), "num_prompts": len(self.prompts),
                                  "examples": len(self.train_set), "cache": [str(d) for d in self.data_dirs],
                                  "generation": D.generation_settings(self.data)},
                         "loss": cfg.loss, "temperature": cfg.temperature, "ce_weight": cfg.ce_weight,
                         "top_k": cfg.top_k,
                         "lr": cfg.head.lr, "steps": self.step, "matmul_dtype": str(self.matmul_dtype),
                         "batch_size": self.batch_size * self.world, "epochs": cfg.epochs, "dtype": str(self.dtype),
                         "seed": cfg.seed},
            "heldout": {"top1": metrics.get("top1"), "expected_acceptance": metrics.get("expected_acceptance"),
                        "positions": metrics.get("positions"), "untrained_top1": untrained}
                       | ({"top1_by_source": top1_by_source} if top1_by_source else {}),
        }
        head.metadata = metadata
        head._hub_mixin_config["metadata"] = metadata  # what save_pretrained writes to config.json
        folder = self.out_dir / f"head_L{exit_layer}_{cfg.head.type}"
        with atomic_folder(folder) as tmp:
            head.save_pretrained(tmp)
        return {"exit_layer": exit_layer, "head_path": str(folder), "heldout_top1": metrics.get("top1"),
                "heldout_expected_acceptance": metrics.get("expected_acceptance"), "heldout_top1_untrained": untrained} \
            | ({"heldout_top1_by_source": top1_by_source} if top1_by_source else {})

    def _result(self, per_head: list[dict], heldout: dict) -> dict:
        """metrics.json: the head(s) first (one head: flat fields; several: lists and `heads`), then the run."""
        cfg = self.cfg
        result = {"head": cfg.head.type, "model": self.base.name, "steps": self.step,
                  "train_examples": len(self.train_set),
                  "train_positions": sum(len(e.loss_positions) for _, e in self.train_set),
                  "heldout_positions": next(iter(heldout.values()), {}).get("positions", 0),
                  "generate_seconds": round(self.gen_seconds, 1), "base_forward_seconds": round(self.features_seconds, 1),
                  "train_seconds": round(self.train_seconds, 1),
                  "total_seconds": round(time.time() - self.t_start, 1), "out_dir": str(self.out_dir),
                  "device": str(self.device), "dtype": str(self.dtype), "matmul_dtype": str(self.matmul_dtype),
                  "gen_dtype": str(self.data.gen_dtype), "gen_compile": bool(self.data.gen_compile),
                  "threads": torch.get_num_threads()}
        if len(per_head) == 1:
            return per_head[0] | result
        return {"head_paths": [h["head_path"] for h in per_head], "exit_layers": self.exit_layers,
                "heldout_top1": [h["heldout_top1"] for h in per_head],
                "heldout_expected_acceptance": [h["heldout_expected_acceptance"] for h in per_head],
                "heads": per_head} | result

    def cleanup(self) -> None:
        """Close the W&B run; every rank waits for rank 0's files."""
        if self.run:
            self.run.finish()
        barrier()
