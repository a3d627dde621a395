"""evaluate.py on a run folder and report.py on a fake multirun folder: exact expected outputs."""
import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from experiments import metrics as M
from experiments.evaluate import Scorer, evaluate_run, load_images
from experiments.report import write_report
from test_metrics import _random_fid_state


def _png(path, seed, size=32):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)


def _run(root, name, caption, inf_model, metrics):
    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"name": "exp", "model": {"name": "sd15"}, "data": {"caption_version": caption},
                                     "inference": {"model": {"name": inf_model}}}), run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_table_csv_and_figure(tmp_path):
    _run(tmp_path, "0_data.caption_version=v1", "v1", "realistic_vision_v51",
         {"cfg_4.0": {"lpips": 0.809, "fid": 192.3}, "cfg_7.5": {"lpips": 0.812, "fid": 196.4}, "notes": {}})
    _run(tmp_path, "1_data.caption_version=v4", "v4", "sd15", {"cfg_4.0": {"lpips": 0.752, "fid": None,
                                                                            "subject_score": 0.7}})
    rows = write_report(tmp_path)
    assert len(rows) == 3
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2:] == [
        "| run | base_model | inference_model | caption | guidance | lpips | fid | subject_score | psnr | ssim |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| exp (0_data.caption_version=v1) | sd15 | realistic_vision_v51 | v1 | 4.000 | 0.809 | 192.3 | n/a | n/a | n/a |",
        "| exp (0_data.caption_version=v1) | sd15 | realistic_vision_v51 | v1 | 7.500 | 0.812 | 196.4 | n/a | n/a | n/a |",
        "| exp (1_data.caption_version=v4) | sd15 | sd15 | v4 | 4.000 | 0.752 | n/a | 0.700 | n/a | n/a |"]
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[0].startswith("run,base_model") and len(csv) == 4
    assert Image.open(tmp_path / "figure5.png").size[0] >= 300
    with pytest.raises(FileNotFoundError, match="no run folders"):
        write_report(tmp_path / "empty_does_not_exist")


def test_evaluate_run_with_backbones_on_disk(tmp_path):
    import torchvision
    refs = tmp_path / "refs"
    for i in range(6):
        _png(refs / f"{i}.png", i)
    run = tmp_path / "run"
    for g in ("4.0", "7.5"):
        for i in range(4):
            _png(run / "samples" / f"cfg_{g}" / f"{i:02d}_00.png", 100 + i)
    OmegaConf.save(OmegaConf.create({"data": {"path": str(refs)}}), run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({"cfg_4.0": {"subject_score": 0.5}}))
    torch.save(_random_fid_state(), tmp_path / "inception.pth")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.pth")
    scorer = Scorer(str(tmp_path / "inception.pth"), str(tmp_path / "alexnet.pth"))
    r = evaluate_run(run, scorer, seed=3)
    m = r["cfg_4.0"]
    assert m["subject_score"] == 0.5 and m["n_generated"] == 4 and m["n_references"] == 6
    gen = load_images(sorted((run / "samples" / "cfg_4.0").glob("*.png")))
    ref = load_images(sorted(refs.glob("*.png")))
    rng = random.Random(3)
    paired = ref[[rng.randrange(6) for _ in range(4)]]
    assert m["psnr"] == pytest.approx(float(M.psnr(gen, paired).mean()))
    assert m["ssim"] == pytest.approx(float(M.ssim(gen, paired).mean()))
    assert m["fid"] is not None and m["fid"] > 0 and m["lpips"] > 0
    assert json.loads((run / "metrics.json").read_text())["cfg_7.5"]["n_generated"] == 4


def test_evaluate_without_weights_reports_null_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohub"))
    refs = tmp_path / "refs"
    for i in range(3):
        _png(refs / f"{i}.png", i)
    run = tmp_path / "run"
    for i in range(2):
        _png(run / "samples" / "cfg_6.0" / f"{i:02d}_00.png", 10 + i)
    OmegaConf.save(OmegaConf.create({"data": {"path": str(refs)}}), run / "config.yaml")
    r = evaluate_run(run, Scorer())
    assert r["cfg_6.0"]["fid"] is None and r["cfg_6.0"]["lpips"] is None
    assert "pt_inception" in r["notes"]["fid"] and "alexnet" in r["notes"]["lpips"]
    assert r["cfg_6.0"]["psnr"] > 0


def test_fid_between_two_folders_cli(tmp_path, capsys):
    from experiments.evaluate import main
    for d, off in (("a", 0), ("b", 50)):
        for i in range(3):
            _png(tmp_path / d / f"{i}.png", off + i)
    torch.save(_random_fid_state(), tmp_path / "inception.pth")
    assert main(["--fid", str(tmp_path / "a"), str(tmp_path / "a"), "--inception", str(tmp_path / "inception.pth")]) == 0
    same = json.loads(capsys.readouterr().out)["fid"]
    main(["--fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", str(tmp_path / "inception.pth")])
    diff = json.loads(capsys.readouterr().out)["fid"]
    from experiments.inception import load_fid_inception
    from data.folder import list_images
    net = load_fid_inception(tmp_path / "inception.pth")
    fa, fb = (M.inception_features(load_images(list_images(tmp_path / d), 299), net) for d in "ab")
    assert abs(same) < 1e-6 and diff == pytest.approx(M.fid_from_features(fa, fb), rel=1e-9, abs=1e-12)
