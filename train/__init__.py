"""Self-distillation of exit heads: `python -m train` (Hydra config: conf/train.yaml)."""
