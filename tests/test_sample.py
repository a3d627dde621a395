"""Whole sampling runs: our pipeline equals diffusers' StableDiffusionPipeline; sample.py writes what it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from lora.inject import inject_lora, lora_layers
from lora.io import save_lora
from models.load import load_model
from models.pipeline import generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEG = "J3NN13, close-up selfie in a room background", "asymmetric eyes, distorted face"


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_generate_equals_diffusers_pipeline(tiny_diffusers_folder, sampler, scheduler):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_diffusers_folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    want = pipe(PROMPT, negative_prompt=NEG, num_inference_steps=8, guidance_scale=6.0, height=64, width=64,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    sd = load_model(tiny_diffusers_folder)
    got = generate(sd, PROMPT, NEG, steps=8, guidance_scale=6.0, sampler=sampler, seed=3, num_images=2,
                   height=64, width=64)
    assert got.shape == want.shape == (2, 3, 64, 64)
    assert want.std() > 0.05  # real images, not a constant
    assert (got - want).abs().max() <= 1e-4
    again = generate(sd, PROMPT, NEG, steps=8, guidance_scale=6.0, sampler=sampler, seed=3, num_images=2,
                     height=64, width=64)
    assert torch.equal(got, again)  # the same seed gives the same image
    other = generate(sd, PROMPT, NEG, steps=8, guidance_scale=6.0, sampler=sampler, seed=4, num_images=2,
                     height=64, width=64)
    assert not torch.equal(got, other)


def _cfg(overrides):
    import training.config  # noqa: F401
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("sample", overrides=overrides)


def test_sample_py_writes_pngs_grid_manifest_with_loras(tiny_diffusers_folder, tmp_path, monkeypatch):
    import sample
    sd = load_model(tiny_diffusers_folder)
    inject_lora(sd.unet, ["to_q", "to_v"], rank=2)
    for _, layer in lora_layers(sd.unet):
        torch.nn.init.normal_(layer.lora["default"].up.weight, std=0.2)
    lora = save_lora({"unet": sd.unet}, tmp_path / "subject.safetensors")
    cfg = _cfg([f"model.path={tiny_diffusers_folder}", f"out_dir={tmp_path / 'out'}", "steps=4", "images_per_prompt=2",
                "height=64", "width=64", f'prompts=["{PROMPT}", "J3NN13, wink"]', "guidance_scale=4.0",
                f"loras=[{{path: {lora}, weight: 0.5}}]"])
    manifest = sample.run(cfg)
    out = tmp_path / "out"
    assert [m["file"] for m in manifest] == ["000_00.png", "000_01.png", "001_00.png", "001_01.png"]
    assert Image.open(out / "grid.png").size == (128, 128)
    params = Image.open(out / "000_01.png").text["parameters"]
    assert params.startswith(PROMPT + " <lora:subject:0.5>\nNegative prompt: asymmetric eyes")
    for part in ["Steps: 4", "Sampler: DDIM", "CFG scale: 4.0", "Seed: 42", "Batch index: 1", "Size: 64x64",
                 "Model hash: ", 'Lora hashes: "subject: ']:
        assert part in params, part
    assert json.loads((out / "manifest.json").read_text())[0]["loras"][0]["weight"] == 0.5
    # The PNG holds exactly what generate() gives with the LoRA at 0.5.
    from lora.io import load_lora
    ref = load_model(tiny_diffusers_folder)
    load_lora({"unet": ref.unet}, lora, multiplier=0.5)
    img = generate(ref, PROMPT, cfg.negative_prompt, steps=4, guidance_scale=4.0, seed=42, num_images=2,
                   height=64, width=64)
    png = torch.tensor(__import__("numpy").array(Image.open(out / "000_01.png"))).permute(2, 0, 1) / 255
    assert (png - img[1]).abs().max() <= 1 / 255 + 1e-6
    # offload=true (the model loaded into host memory, each part on the device for its stage): the same PNGs,
    # within one level
    cfg2 = _cfg([f"model.path={tiny_diffusers_folder}", f"out_dir={tmp_path / 'off'}", "steps=4", "images_per_prompt=2",
                 "height=64", "width=64", f'prompts=["{PROMPT}", "J3NN13, wink"]', "guidance_scale=4.0",
                 f"loras=[{{path: {lora}, weight: 0.5}}]", "offload=true"])
    import models.pipeline as pipeline
    stages, real_parts_on = [], pipeline.parts_on
    monkeypatch.setattr(pipeline, "parts_on", lambda dev, *m: (stages.append(dev is not None), real_parts_on(dev, *m))[1])
    sample.run(cfg2)
    assert stages == [True] * 6   # text encoder, UNet, VAE for each of the two prompts
    import numpy as np
    for name in ["000_01.png", "001_00.png"]:   # (decoded one by one: batched and single convolutions differ in
        a, b = (np.asarray(Image.open(d / name), dtype=int) for d in (out, tmp_path / "off"))  # the last bits)
        assert np.abs(a - b).max() <= 1, name


@pytest.mark.parametrize("override,match", [("steps=0", "steps must be >= 1"), ("guidance_scale=-1", "guidance_scale"),
                                            ("sampler=heun", "unknown sampler"), ("height=65", "divisible by 8"),
                                            ("loras=[{path: nope.safetensors}]", "nope.safetensors does not exist")])
def test_bad_settings_fail_before_loading(override, match, tmp_path):
    import sample
    cfg = _cfg(["model.path=/does/not/exist", f"out_dir={tmp_path}", override])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sample.run(cfg)


def test_guidance_sweep_multirun(tiny_diffusers_folder, tmp_path):
    cmd = [sys.executable, "sample.py", "-m", f"model.path={tiny_diffusers_folder}", "guidance_scale=4.0,7.5",
           "steps=2", "images_per_prompt=1", "height=64", "width=64", f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and (p / "grid.png").exists())
    assert [r.split(",")[0] for r in runs] == ["0_guidance_scale=4.0", "1_guidance_scale=7.5"]
    a = Image.open(tmp_path / runs[0] / "000_00.png").text["parameters"]
    assert "CFG scale: 4.0" in a


def test_default_size_is_the_models_own(tiny_diffusers_folder, tmp_path):
    """height/width null: the UNet's sample_size x the VAE's factor (SD1.5 512, SDXL 1024; here 8 x 2)."""
    import sample
    cfg = _cfg([f"model.path={tiny_diffusers_folder}", f"out_dir={tmp_path / 'out'}", "steps=2",
                "images_per_prompt=1"])
    manifest = sample.run(cfg)
    assert Image.open(tmp_path / "out" / "000_00.png").size == (16, 16)
    assert (manifest[0]["width"], manifest[0]["height"]) == (16, 16)
    assert "Size: 16x16" in Image.open(tmp_path / "out" / "000_00.png").text["parameters"]


def test_vae_tiling_equals_diffusers(tiny_diffusers_folder):
    """generate(vae_tiling=True) at 64x64 (the tiny VAE's tiles are 32 px): diffusers' enable_vae_tiling image."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_diffusers_folder), safety_checker=None)
    pipe.vae.enable_tiling()
    want = pipe(PROMPT, negative_prompt=NEG, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                generator=torch.Generator().manual_seed(3), output_type="pt").images
    sd = load_model(tiny_diffusers_folder)
    got = generate(sd, PROMPT, NEG, steps=4, guidance_scale=6.0, seed=3, height=64, width=64, vae_tiling=True)
    plain = generate(sd, PROMPT, NEG, steps=4, guidance_scale=6.0, seed=3, height=64, width=64)
    assert (got - want).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-4  # the tiles did change the decode


def test_offload_moves_each_part_for_its_stage_and_changes_nothing(tiny_sdxl_folder, monkeypatch):
    """generate(offload=device): the text encoders, then the UNet, then the VAE come to the device and go back to
    host memory, each only for its stage (diffusers' enable_model_cpu_offload order), and the images are the
    same. On a CPU both places are the same memory: this checks the order, the GPU bench the memory."""
    import contextlib

    from models import pipeline
    sd = load_model(tiny_sdxl_folder)
    want = generate(sd, "a cat", steps=3, height=64, width=64, num_images=2, seed=1)
    names = {id(m): n for n, m in [("te1", sd.text_encoder), ("te2", sd.text_encoder_2), ("unet", sd.unet),
                                   ("vae", sd.vae)]}
    stages, real_parts_on = [], pipeline.parts_on

    @contextlib.contextmanager
    def spy(device, *modules):
        parts = [names[id(m)] for m in modules]
        stages.append(("on", parts))
        with real_parts_on(device, *modules):
            yield
        stages.append(("off", parts))
    monkeypatch.setattr(pipeline, "parts_on", spy)
    got = generate(sd, "a cat", steps=3, height=64, width=64, num_images=2, seed=1, offload="cpu")
    assert stages == [("on", ["te1", "te2"]), ("off", ["te1", "te2"]), ("on", ["unet"]), ("off", ["unet"]),
                      ("on", ["vae"]), ("off", ["vae"])], stages
    assert torch.equal(got, want)


def test_parts_on_copies_weights_to_the_device_and_points_back_at_the_host_ones(monkeypatch):
    """models/pipeline.parts_on: inside, every parameter and buffer is a copy on the device (here a CPU "device"
    whose Tensor.to copies); after, each is the very host tensor it was (no copy back), also when the module
    converted its weights in between and back (as upcast_vae does)."""
    from models.pipeline import parts_on
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    tensors = lambda: (*m.parameters(), *m.buffers())              # noqa: E731
    before = [t.data.data_ptr() for t in tensors()]
    values = [t.detach().clone() for t in tensors()]
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: real_to(self, *a, **k).clone())
    with parts_on("cpu", m):
        inside = [t.data.data_ptr() for t in tensors()]
        m.double()
        m.float()
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert not set(inside) & set(before)                           # copies inside
    assert [t.data.data_ptr() for t in tensors()] == before        # the host tensors after
    assert all(torch.equal(v, t) and v.dtype == t.dtype for v, t in zip(values, tensors()))
