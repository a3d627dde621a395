"""Load and save Stable Diffusion 1.x/2.x and SDXL: diffusers folders, single-file LDM checkpoints, separate VAEs.

    sd = load_model("path/to/stable-diffusion-v1-5")                 # diffusers folder
    sd = load_model("Realistic_Vision_V5.1.safetensors",             # single file ...
                    vae="vae-ft-mse-840000-ema-pruned.safetensors")  # ... with a separate VAE
    sd = load_model("runwayml/stable-diffusion-v1-5")                # hub id, when the network allows

Everything is strict (models/checkpoint.py): a missing, unexpected or mis-shaped key raises an
error that names it.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import ldm_keys, openclip_keys, sd2_layout, sdxl_layout, text
from models.checkpoint import CheckpointError, load_strict, no_init, read_state_dict, write_safetensors
from models.unet import UNet2DConditionModel, UNetConfig
from models.vae import AutoencoderKL, VAEConfig

# SD's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), used for single files.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "clip_sample": False, "prediction_type": "epsilon",
                  "trained_betas": None}
# Non-parameter buffers of LDM's LatentDiffusion that single files carry (the schedule, recomputable).
_LDM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
                "model_ema.decay", "model_ema.num_updates"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                 "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"]


@dataclass
class StableDiffusion:
    """The parts of an SD checkpoint: what train.py and sample.py work with."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict = field(default_factory=lambda: dict(SD15_SCHEDULER))
    source: str = ""
    text_encoder_2: nn.Module | None = None  # SDXL: OpenCLIP bigG with its projection
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False  # SDXL base: an empty negative prompt is all zeros

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders by their part name (LoRA files and diffusers folders use the same names)."""
        return {"text_encoder": self.text_encoder,
                **({"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {})}

    @property
    def parts(self) -> dict[str, nn.Module]:
        """What a LoRA file can adapt: {"unet", "text_encoder"[, "text_encoder_2"]}."""
        return {"unet": self.unet, **self.text_encoders}

    def set_triton_kernels(self, enabled: bool = True) -> None:
        """Sampling's kernels (sample.py's triton_kernels): the UNet's, and the VAE's NHWC path unless its config
        decodes in fp32 (force_upcast: SDXL's VAE, which stays NCHW on torch's kernels). After loading LoRAs:
        their conv weights go channels_last too."""
        self.unet.set_triton_kernels(enabled)
        if not self.vae.config.force_upcast:
            self.vae.set_triton_kernels(enabled)

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        for m in (self.unet, self.vae, *self.text_encoders.values()):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self


def pick_device(name: str) -> torch.device:
    """"auto" = cuda when available, else cpu; anything else as torch.device reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------- entry point

def load_model(path: str | Path, dtype="fp32", device="cpu", vae: str | Path | None = None,
               config: str | Path | None = None, variant: str | None = None,
               use_ema: bool = False) -> StableDiffusion:
    """A diffusers folder, a single-file checkpoint, or a hub repo id -> StableDiffusion.

    vae: a separate VAE (diffusers folder or single file) replacing the model's own.
    config: for single files, a diffusers-layout folder whose unet/, vae/, text_encoder/ configs
        describe the architecture (default: SD1.5's). variant: "fp16" picks `*.fp16.safetensors`.
    use_ema: single files only, load the UNet from the `model_ema.*` copy.
    """
    p = resolve(path)
    if p.is_dir():
        sd = load_diffusers_folder(p, variant=variant, skip_vae=vae is not None)
    else:
        sd = load_single_file(p, config=config, use_ema=use_ema, skip_vae=vae is not None)
    if vae is not None:
        sd.vae = load_vae(resolve(vae))
    return sd.to(device=device, dtype=as_dtype(dtype))


def resolve(path: str | Path) -> Path:
    """A local path, or a Hugging Face repo id fetched through huggingface_hub when the network allows."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(str(path), allow_patterns=_HUB_PATTERNS))
        except Exception as e:
            raise FileNotFoundError(
                f"{path!r} is not a local path and could not be fetched from the Hugging Face hub ({type(e).__name__}). "
                f"Offline, download it elsewhere and copy it here as a diffusers folder: model_index.json, "
                f"unet/{{config.json,diffusion_pytorch_model.safetensors}}, vae/{{same}}, "
                f"text_encoder/{{config.json,model.safetensors}}, tokenizer/{{vocab.json,merges.txt}}, "
                f"scheduler/scheduler_config.json; or pass a single-file .safetensors checkpoint.") from e
    raise FileNotFoundError(f"model {path} does not exist (a diffusers folder or a .safetensors file)")


# ---------------------------------------------------------------- diffusers folders

def _weights_file(folder: Path, stem: str, variant: str | None) -> Path | list[Path]:
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"] + \
            ([f"{stem}.{variant}.bin"] if variant else []) + [f"{stem}.bin", f"{stem}.fp16.safetensors"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():  # sharded
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    raise FileNotFoundError(f"no weights in {folder}: expected {names[0]} (or {', '.join(names[1:])})")


def _read_weights(folder: Path, stem: str, variant: str | None) -> tuple[dict, str]:
    f = _weights_file(folder, stem, variant)
    if isinstance(f, list):
        sd = {}
        for shard in f:
            sd.update(read_state_dict(shard))
        return sd, str(folder)
    return read_state_dict(f), str(f)


def _read_config(folder: Path, name: str = "config.json") -> dict:
    f = folder / name
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: a diffusers component folder needs its {name}")
    return json.loads(f.read_text())


def load_unet_folder(folder: Path, variant: str | None = None) -> UNet2DConditionModel:
    with no_init():  # every weight is read next, strictly
        unet = UNet2DConditionModel(UNetConfig.from_dict(_read_config(folder), str(folder / "config.json")))
    sd, src = _read_weights(folder, "diffusion_pytorch_model", variant)
    load_strict(unet, sd, src)
    return unet.eval()


def load_vae_folder(folder: Path, variant: str | None = None) -> AutoencoderKL:
    with no_init():
        vae = AutoencoderKL(VAEConfig.from_dict(_read_config(folder), str(folder / "config.json")))
    sd, src = _read_weights(folder, "diffusion_pytorch_model", variant)
    load_strict(vae, sd, src)
    return vae.eval()


def load_text_encoder_folder(folder: Path, variant: str | None = None) -> nn.Module:
    with no_init():
        te = text.build_text_encoder(_read_config(folder))
    sd, src = _read_weights(folder, "model", variant)
    load_strict(te, text.from_published(sd, te), src)
    return te.eval()


def load_diffusers_folder(folder: Path, variant: str | None = None, skip_vae: bool = False) -> StableDiffusion:
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer")
               if not (folder / d).is_dir() and not (d == "vae" and skip_vae)]
    if missing:
        raise FileNotFoundError(f"{folder} is not a diffusers SD folder: missing {', '.join(missing)}/ "
                                f"(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    sched = folder / "scheduler" / "scheduler_config.json"
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    unet = load_unet_folder(folder / "unet", variant)
    sdxl = unet.config.addition_embed_type == "text_time"
    if sdxl and not ((folder / "text_encoder_2").is_dir() and (folder / "tokenizer_2").is_dir()):
        raise FileNotFoundError(f"{folder} has an SDXL UNet but no text_encoder_2/ and tokenizer_2/: "
                                f"an SDXL folder has both (refiner-only folders are not supported)")
    return StableDiffusion(
        unet=unet,
        vae=None if skip_vae else load_vae_folder(folder / "vae", variant),
        text_encoder=load_text_encoder_folder(folder / "text_encoder", variant),
        tokenizer=text.load_tokenizer(folder / "tokenizer"),
        scheduler_config=json.loads(sched.read_text()) if sched.is_file() else dict(SD15_SCHEDULER),
        source=str(folder),
        text_encoder_2=load_text_encoder_folder(folder / "text_encoder_2", variant) if sdxl else None,
        tokenizer_2=text.load_tokenizer(folder / "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)))


# ---------------------------------------------------------------- single files

def _component_configs(config: str | Path | None) -> tuple[UNetConfig, VAEConfig, dict, dict]:
    if config is None:
        return UNetConfig(), VAEConfig(), dict(text.SD15_TEXT_CONFIG), dict(SD15_SCHEDULER)
    c = Path(config)
    sched = c / "scheduler" / "scheduler_config.json"
    return (UNetConfig.from_dict(_read_config(c / "unet"), str(c / "unet")),
            VAEConfig.from_dict(_read_config(c / "vae"), str(c / "vae")),
            _read_config(c / "text_encoder"),
            json.loads(sched.read_text()) if sched.is_file() else dict(SD15_SCHEDULER))


def _take(sd: dict, key_map: dict[str, str], consumed: set, source: str, squeeze=None) -> dict:
    """Pick our keys out of an LDM state dict through key_map (ours -> LDM); missing keys raise."""
    missing = [ldm for ldm in key_map.values() if ldm not in sd]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} missing keys: {', '.join(missing[:12])}"
                              f"{' ...' if len(missing) > 12 else ''}. Is this checkpoint for this architecture "
                              f"(pass config=<diffusers folder> for a non-SD1.5 one)?")
    out = {}
    for ours, ldm in key_map.items():
        t = sd[ldm]
        if squeeze and squeeze(ldm) and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[ours] = t
        consumed.add(ldm)
    return out


def load_single_file(path: Path, config: str | Path | None = None, use_ema: bool = False,
                     skip_vae: bool = False) -> StableDiffusion:
    """A single-file LDM checkpoint (A1111/CivitAI style, SD1.x, SD2.x or SDXL) -> StableDiffusion."""
    sd = read_state_dict(path)
    if not any(k.startswith(ldm_keys.UNET_PREFIX) for k in sd):
        raise CheckpointError(f"{path} has no {ldm_keys.UNET_PREFIX}* keys: not a Stable Diffusion checkpoint "
                              f"(a LoRA or a VAE file given as the base model?)")
    kind = "sdxl" if any(k.startswith(sdxl_layout.TEXT1_PREFIX) for k in sd) else \
        "sd2" if any(k.startswith(sd2_layout.TEXT_PREFIX) for k in sd) else "sd1"
    if kind == "sdxl":
        ucfg, vcfg, tcfgs, sched = sdxl_layout.component_configs(config, _read_config)
    else:
        if kind == "sd2" and config is None:
            warnings.warn(f"{path}: an SD2.x single file, read as SD2.1 (768x768, v-prediction) as diffusers does; "
                          f"for SD2.x-base (512, epsilon) pass config=<its diffusers folder>", stacklevel=3)
            ucfg, vcfg, tcfg, sched = (UNetConfig.from_dict(sd2_layout.UNET, "SD2.1"), VAEConfig(),
                                       dict(sd2_layout.TEXT), dict(sd2_layout.SCHEDULER))
        else:
            ucfg, vcfg, tcfg, sched = _component_configs(config)
        tcfgs = {"text_encoder": tcfg}
    consumed: set[str] = set()
    unet = _unet_from_ldm(sd, ucfg, path, use_ema, consumed)
    vae = None
    if skip_vae:
        consumed.update(k for k in sd if k.startswith(ldm_keys.VAE_PREFIX))
    else:
        vae = _vae_from_ldm(sd, vcfg, path, consumed)
    tes = {}
    for part, tcfg in tcfgs.items():
        with no_init():
            te = text.build_text_encoder(tcfg)
        tsd = _text_from_ldm(sd, part, kind, tcfg, consumed, path)
        load_strict(te, text.from_published(tsd, te), f"{path} ({part})")
        tes[part] = te.eval()

    leftover = [k for k in sd if k not in consumed and k not in _LDM_BUFFERS
                and not (k.startswith(ldm_keys.EMA_PREFIX) and not use_ema)]
    if leftover:
        raise CheckpointError(f"{path}: {len(leftover)} unexpected keys that no part of the model takes: "
                              f"{', '.join(sorted(leftover)[:12])}")
    sdxl = kind == "sdxl"
    tok = text.load_tokenizer(pad_token=sd2_layout.PAD_TOKEN if kind == "sd2" else None)
    return StableDiffusion(unet.eval(), vae.eval() if vae else None, tes["text_encoder"], tok,
                           sched, str(path), text_encoder_2=tes.get("text_encoder_2"),
                           tokenizer_2=text.load_tokenizer(pad_token=text.SDXL_PAD_TOKEN_2) if sdxl else None,
                           force_zeros_for_empty_prompt=sdxl)


def _unet_from_ldm(sd: dict, ucfg: UNetConfig, path: Path, use_ema: bool, consumed: set) -> UNet2DConditionModel:
    with no_init():  # every weight is read next, strictly
        unet = UNet2DConditionModel(ucfg)
    umap = ldm_keys.map_keys(unet.state_dict(), ldm_keys.unet_prefix_map(ucfg), ldm_keys.UNET_PREFIX)
    if use_ema:
        umap_ema = {k: ldm_keys.ema_key(v) for k, v in umap.items()}
        if umap_ema and next(iter(umap_ema.values())) not in sd:
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*); load without use_ema")
        load_strict(unet, _take(sd, umap_ema, consumed, f"{path} (EMA UNet)"), f"{path} (EMA UNet)")
        consumed.update(k for k in sd if k.startswith(ldm_keys.UNET_PREFIX))
    else:
        load_strict(unet, _take(sd, umap, consumed, f"{path} (UNet)"), f"{path} (UNet)")
    return unet


def _vae_from_ldm(sd: dict, vcfg: VAEConfig, path: Path, consumed: set) -> AutoencoderKL:
    if not any(k.startswith(ldm_keys.VAE_PREFIX) for k in sd):
        raise CheckpointError(f"{path} has no VAE weights ({ldm_keys.VAE_PREFIX}*): pass a separate vae=<path>")
    with no_init():
        vae = AutoencoderKL(vcfg)
    vmap = ldm_keys.map_keys(vae.state_dict(), ldm_keys.vae_prefix_map(vcfg), ldm_keys.VAE_PREFIX)
    load_strict(vae, _take(sd, vmap, consumed, f"{path} (VAE)", ldm_keys.is_vae_attention_conv), f"{path} (VAE)")
    return vae


def _text_from_ldm(sd: dict, part: str, kind: str, tcfg: dict, consumed: set, path: Path) -> dict:
    """One text encoder's weights out of a single file, in published (`text_model.*`) names.
    kind: sd1 | sd2 | sdxl (models/sd2_layout.py, models/sdxl_layout.py)."""
    openclip = {"sd2": sd2_layout.TEXT_PREFIX, "sdxl": sdxl_layout.TEXT2_PREFIX if part == "text_encoder_2" else None}
    if openclip.get(kind):  # SD2's ViT-H (23 of its 24 blocks, no projection) or SDXL's bigG
        prefix = openclip[kind]
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        consumed.update(prefix + k for k in own)
        try:
            return openclip_keys.to_hf(own, f"{path} ({part})", tcfg["num_hidden_layers"] if kind == "sd2" else None,
                                       projection=text.has_projection(tcfg))
        except KeyError as e:
            raise CheckpointError(str(e)) from None
    prefix = sdxl_layout.TEXT1_PREFIX if kind == "sdxl" else ldm_keys.TEXT_PREFIX
    tsd = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            tsd[rest if rest.startswith("text_model.") else "text_model." + rest] = v  # old files lack the level
            consumed.add(k)
    return tsd


def load_vae(path: Path, config: str | Path | None = None) -> AutoencoderKL:
    """A separate VAE: a diffusers vae/ folder, or a single file in LDM or diffusers names."""
    if path.is_dir():
        return load_vae_folder(path)
    sd = read_state_dict(path)
    sd = {k.removeprefix(ldm_keys.VAE_PREFIX): v for k, v in sd.items()
          if not k.startswith(("loss.", "model_ema."))}  # VAE training ckpts carry their discriminator
    vcfg = VAEConfig.from_dict(json.loads(Path(config).read_text())) if config else VAEConfig()
    with no_init():
        vae = AutoencoderKL(vcfg)
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):  # already diffusers names
        load_strict(vae, sd, str(path))
        return vae.eval()
    vmap = ldm_keys.map_keys(vae.state_dict(), ldm_keys.vae_prefix_map(vcfg), "")
    consumed: set[str] = set()
    mapped = _take(sd, vmap, consumed, str(path), ldm_keys.is_vae_attention_conv)
    extra = sorted(set(sd) - consumed)
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected keys in a VAE file: {', '.join(extra[:12])}")
    load_strict(vae, mapped, str(path))
    return vae.eval()


# ---------------------------------------------------------------- saving

def save_diffusers_folder(sd: StableDiffusion, folder: str | Path, dtype=None) -> Path:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ as diffusers does."""
    folder = Path(folder)
    cast = (lambda t: t.to(as_dtype(dtype))) if dtype else (lambda t: t)
    parts = {"unet": (sd.unet, sd.unet.config.to_dict(), "diffusion_pytorch_model.safetensors", None),
             "vae": (sd.vae, sd.vae.config.to_dict(), "diffusion_pytorch_model.safetensors", None)}
    for name, te in sd.text_encoders.items():
        parts[name] = (te, te.config.to_dict(), "model.safetensors", lambda s, te=te: text.to_published(s, te))
    for name, (module, cfg, fname, rename) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        state = {k: cast(v) for k, v in module.state_dict().items()}
        write_safetensors(rename(state) if rename else state, folder / name / fname, {"format": "pt"})
    text.save_tokenizer(sd.tokenizer, folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd.scheduler_config, indent=2))
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", sd.scheduler_config.get("_class_name", "PNDMScheduler")]}
    if sd.text_encoder_2 is not None:
        text.save_tokenizer(sd.tokenizer_2, folder / "tokenizer_2")
        index.update({"_class_name": "StableDiffusionXLPipeline",
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "force_zeros_for_empty_prompt": sd.force_zeros_for_empty_prompt})
    else:
        index.update({"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
                      "feature_extractor": [None, None], "requires_safety_checker": False})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def to_ldm_state_dict(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our three modules -> one LDM-named state dict (what A1111 and ComfyUI load)."""
    out = {}
    usd = sd.unet.state_dict()
    for ours, ldm in ldm_keys.map_keys(usd, ldm_keys.unet_prefix_map(sd.unet.config), ldm_keys.UNET_PREFIX).items():
        out[ldm] = usd[ours]
    vsd = sd.vae.state_dict()
    for ours, ldm in ldm_keys.map_keys(vsd, ldm_keys.vae_prefix_map(sd.vae.config), ldm_keys.VAE_PREFIX).items():
        t = vsd[ours]
        out[ldm] = t[:, :, None, None] if ldm_keys.is_vae_attention_conv(ldm) and t.ndim == 2 else t
    if sd.text_encoder_2 is None:  # SD1.x (OpenAI CLIP), SD2.x (OpenCLIP ViT-H)
        out.update(_text_to_ldm(sd.text_encoder, sd2_layout.TEXT_PREFIX if text.is_openclip(sd.text_encoder.config)
                                else ldm_keys.TEXT_PREFIX))
    else:  # SDXL: CLIP-L in transformers' names, OpenCLIP bigG in its own
        out.update(_text_to_ldm(sd.text_encoder, sdxl_layout.TEXT1_PREFIX))
        out.update(_text_to_ldm(sd.text_encoder_2, sdxl_layout.TEXT2_PREFIX))
    return out


def _text_to_ldm(te: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A text encoder's weights under a single file's prefix: OpenCLIP towers in OpenCLIP names."""
    pub = text.to_published(te.state_dict(), te)
    return {prefix + k: v for k, v in (openclip_keys.from_hf(pub) if text.is_openclip(te.config) else pub).items()}


def save_single_file(sd: StableDiffusion, path: str | Path, dtype=None, metadata: dict | None = None) -> Path:
    state = to_ldm_state_dict(sd)
    if dtype:
        state = {k: v.to(as_dtype(dtype)) for k, v in state.items()}
    write_safetensors(state, path, {"format": "pt", **(metadata or {})})
    return Path(path)
