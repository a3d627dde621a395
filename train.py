"""Train a LoRA (Hydra entry point).

    python train.py +experiment=exp4_transfer                 # the Hieu report's experiment 4
    python train.py -m +experiment=exp3_rv_v4 +sweep=rank     # an ablation sweep
    python train.py +experiment=exp4_transfer resume=outputs/exp4_transfer/2026-11-23_10-00-00

The run folder (Hydra's output dir) receives the resolved config, TensorBoard events (tb/),
LoRA checkpoints (kohya format), previews, the training state for resume and result JSON.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers ${root:})
from training.loop import train


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    print(f"{result['status']} at step {result['step']}; run folder {cfg.run_dir}")
    return result.get("loss_smooth")


if __name__ == "__main__":
    main()
