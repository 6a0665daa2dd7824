"""python -m scripts.sweep_point exit_layer=12 head_type=mlp [prompts=... limit=...]: one grid point of a W&B sweep.

`wandb agent` runs this with the grid point as Hydra overrides (scripts/wandb_sweep.yaml): it trains one
head, measures it with the real decoders exactly as `scripts.sweep` does (same code, own sweep folder,
so an interrupted point resumes), and logs `speedup` (the best measured speedup over ar, ppsd or eesd,
the sweep's metric) with the acceptance and the plots to the agent's W&B run.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from heads.cli import entry_point
from heads.schema import SweepPointConfig
from scripts.sweep import exit_on_sigterm, sweep
from scripts.sweep_plan import model_slug


def metrics(results: dict) -> dict:
    """The run's W&B summary: `speedup` is what the W&B sweep maximises."""
    row = max(results["candidates"], key=lambda r: r.get("best_speedup") or 0.0)
    return {"speedup": row.get("best_speedup"), "best_method": row.get("best_method"),
            "ppsd_speedup": row.get("ppsd_speedup"), "eesd_speedup": row.get("eesd_speedup"),
            "acceptance_rate": row.get("acceptance_rate"), "ppsd_predicted_speedup": row.get("ppsd_predicted_speedup"),
            "ideal_speedup": row.get("ideal_speedup"), "heldout_expected_acceptance": row.get("heldout_expected_acceptance"),
            "ar_tokens_per_s": row.get("ar_tokens_per_s")}


def run_point(cfg: DictConfig) -> dict:
    import wandb

    point = cfg.model_dump()
    out_dir = cfg.out_dir or str(Path("sweeps") / "wandb" / model_slug(str(cfg.model)) / f"L{cfg.exit_layer}-{cfg.head_type}")
    sweep_cfg = cfg.model_copy(update={"exit_layers": [cfg.exit_layer], "heads": [cfg.head_type], "out_dir": out_dir})
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, job_type="sweep_point",
                     config={k: point[k] for k in ("model", "exit_layer", "head_type", "stages", "gammas", "prompts", "limit",
                                                   "max_new_tokens", "train_overrides", "decode_overrides")})
    try:
        summary = sweep(sweep_cfg)
        results = json.loads((Path(summary["out_dir"]) / "results.json").read_text())
        logged = {k: v for k, v in metrics(results).items() if v is not None}
        images = {name: wandb.Image(f"{summary['out_dir']}/{name}.png")
                  for name in ("speedup_vs_exit_layer", "acceptance_vs_exit_layer")}
        run.log(logged | images)
        run.summary.update(logged)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return summary | {"speedup": logged.get("speedup"), "wandb_run": run.id}


@entry_point("sweep_point", SweepPointConfig)
def main(cfg: DictConfig) -> None:
    exit_on_sigterm()
    print(json.dumps(run_point(cfg)), flush=True)


if __name__ == "__main__":
    main()
