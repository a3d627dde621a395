"""Every experiment and sweep config composes, alone and with the tiny world."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import training.config  # noqa: F401
from training.config import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return cfg


def test_all_experiments_listed():
    assert {"exp0_baseline", "exp1_rv_v1", "exp2_rv_v3", "exp3_rv_v4", "exp4_transfer", "ffhq_faces",
            "pixel_illustration", "character"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("world", [None, "tiny"])
def test_experiment_composes(exp, world):
    cfg = _compose([f"+experiment={exp}"] + ([f"+world={world}"] if world else []))
    c = OmegaConf.to_container(cfg, resolve=False)
    assert cfg.name == exp
    for key in ("model.path", "data.path", "lora.rank", "optim.lr", "train.batch_size"):
        OmegaConf.select(cfg, key, throw_on_missing=True)
    if world == "tiny":
        root = str(Path(training.config.ROOT))
        assert cfg.model.path.startswith(root + "/assets/tiny-")
        if cfg.inference.enabled:
            assert cfg.inference.model.path.startswith(root + "/assets/tiny-")
    assert c  # resolvable structure


def test_report_values():
    e4 = _compose(["+experiment=exp4_transfer", "+world=tiny"])
    assert e4.model.path.endswith("tiny-sd15") and e4.inference.model.path.endswith("tiny-realistic")
    assert e4.data.caption_version == "v4" and list(e4.inference.guidance_scales) == [4.0, 6.0, 7.5]
    e1 = _compose(["+experiment=exp1_rv_v1"])
    assert (e1.lora.rank, e1.lora.alpha, e1.lora.dropout, e1.train.batch_size, e1.optim.lr, e1.train.epochs) == \
        (32, 16, 0.1, 2, 5e-5, 300)
    assert list(e1.lora.targets) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert e1.model.vae.endswith("vae-ft-mse-840000-ema-pruned.safetensors")
    ff = _compose(["+experiment=ffhq_faces"])
    assert (ff.lora.rank, ff.lora.alpha, ff.train.grad_accum, ff.train.precision, ff.optim.schedule) == \
        (16, 32, 4, "fp16", "cosine")
    px = _compose(["+experiment=pixel_illustration"])
    assert (px.lora.rank, px.lora.alpha, px.train.max_steps, px.seed, px.data.flip_p) == (4, 4, 600, 42, 0.5)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes(sweep):
    cfg = _compose(["+experiment=exp3_rv_v4", f"+sweep={sweep}"])
    assert cfg.hydra.sweeper.params
