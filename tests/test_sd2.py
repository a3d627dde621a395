"""SD2.x single files (OpenCLIP ViT-H text tower under cond_stage_model.model.*): written by us, read by diffusers'
from_single_file and by us; a file as Stability publishes it (24 layers, text_projection, logit_scale) loads."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TEXT_CONFIG, diffusers_unet, diffusers_vae, randomize
from models.checkpoint import CheckpointError
from models.load import load_model, save_single_file
from models.pipeline import generate

PROMPT = "J3NN13, close-up selfie in a room background"


@pytest.fixture(scope="module")
def tiny_sd2_folder(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.text import load_tokenizer
    folder = tmp_path_factory.mktemp("tiny_sd2") / "model"
    torch.manual_seed(0)
    te = randomize(CLIPTextModel(CLIPTextConfig(**dict(TEXT_CONFIG, hidden_act="gelu"))), 3, scale=0.05).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(unet=diffusers_unet("sd2"), vae=diffusers_vae(), text_encoder=te,
                                   tokenizer=load_tokenizer(pad_token="!"), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def test_sd2_single_file_round_trips_and_loads_in_diffusers(tiny_sd2_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    sd = load_model(tiny_sd2_folder)
    f = save_single_file(sd, tmp_path / "v2.safetensors")
    keys = load_file(str(f))
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    with pytest.warns(UserWarning, match="SD2.1"):  # without config=: SD2.1's shapes (and an error: tiny file)
        with pytest.raises(CheckpointError, match="v2.safetensors"):
            load_model(f)
    again = load_model(f, config=tiny_sd2_folder)
    assert again.tokenizer.pad_token == "!" and again.scheduler_config["prediction_type"] == "v_prediction"
    for part, mod in sd.parts.items():
        other = again.parts[part].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in mod.state_dict().items()), part
    ref = StableDiffusionPipeline.from_single_file(str(f), config=str(tiny_sd2_folder), safety_checker=None)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, height=32, width=32)
    want = ref(PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(2), output_type="pt",
               **kw).images
    got = generate(again, PROMPT, "blurry", steps=5, guidance_scale=5.0, seed=2, height=32, width=32)
    assert want.std() > 0.05 and (got - want).abs().max() <= 1e-4


def test_published_sd2_file_drops_the_unused_last_layer_and_projection(tiny_sd2_folder, tmp_path):
    """Stability's files carry all 24 OpenCLIP layers, text_projection and logit_scale; SD2 (and diffusers'
    text_encoder/) use 23 layers and no projection: the extra keys are taken and dropped, the rest loads."""
    sd = load_model(tiny_sd2_folder)
    state = load_file(str(save_single_file(sd, tmp_path / "v2.safetensors")))
    n = sd.text_encoder.config.num_hidden_layers
    for k in [k for k in state if ".resblocks.0." in k]:
        state[k.replace(".resblocks.0.", f".resblocks.{n}.")] = torch.randn(state[k].shape)
    state["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file(state, str(tmp_path / "published.safetensors"))
    loaded = load_model(tmp_path / "published.safetensors", config=tiny_sd2_folder)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).last_hidden_state, sd.text_encoder(ids).last_hidden_state)
    state["cond_stage_model.model.transformer.resblocks.1.attn.bogus"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bogus.safetensors"))
    with pytest.raises(CheckpointError, match="bogus.safetensors.*resblocks.1.attn.bogus"):
        load_model(tmp_path / "bogus.safetensors", config=tiny_sd2_folder)
