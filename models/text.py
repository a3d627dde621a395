"""The CLIP text encoders and tokenizer of SD1.x and SDXL, through transformers.

SD1.x: CLIP ViT-L/14's text tower (`CLIPTextModel`). SDXL adds OpenCLIP ViT-bigG/14's text tower with
its projection (`CLIPTextModelWithProjection`, `text_encoder_2`); both read the same BPE vocabulary,
the second pads with "!" instead of "<|endoftext|>" (SDXL's tokenizer_2/tokenizer_config.json).

Two things the community expects, documented here:
- clip_skip (AUTOMATIC1111's convention): 1 = the last layer's output (SD's default); 2 = the
  penultimate layer's output, passed through the final LayerNorm as A1111 and kohya do.
- Prompts longer than 75 tokens: `long_prompt="truncate"` (diffusers' behaviour: cut to 77 with BOS
  and EOS, with a warning that names the dropped words) or `"chunk"` (A1111's: split into 75-token
  chunks, encode each as its own 77-token window, concatenate along the sequence: (B, 77*k, D)).

Published checkpoints name the parameters `text_model.*` (transformers < 5.6); newer transformers
flatten them. `to_published` and `from_published` translate, so files keep the published names
whatever transformers is installed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BUNDLED_TOKENIZER = Path(__file__).parent / "clip_tokenizer"
MAX_LEN = 77
VOCAB_SIZE = 49408

# CLIP ViT-L/14's text tower, the text encoder of every SD1.x checkpoint.
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2,
                        pad_token_id=1)
# SDXL's text_encoder_2/config.json (OpenCLIP ViT-bigG/14): its text_projection gives the pooled embedding.
SDXL_TEXT2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                         layer_norm_eps=1e-5, projection_dim=1280, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1, architectures=["CLIPTextModelWithProjection"])
SDXL_PAD_TOKEN_2 = "!"
# Buffers some published files carry that are not parameters (position ids are arange(77)).
IGNORED_KEYS = ("text_model.embeddings.position_ids",)


def load_tokenizer(folder: str | Path = BUNDLED_TOKENIZER, pad_token: str | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer; pad_token overrides the folder's (SDXL's second tokenizer pads with "!")."""
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    has_pair = vocab.is_file() and merges.is_file()
    if (folder / "tokenizer.json").is_file() or ((folder / "tokenizer_config.json").is_file() and has_pair):
        tok = CLIPTokenizer.from_pretrained(str(folder))  # reads the pad token from tokenizer_config.json
    elif has_pair:
        # positional: transformers 5 ignores the paths when given as keywords (NOTES.md)
        tok = CLIPTokenizer(str(vocab), str(merges))
    else:
        raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json and merges.txt (or tokenizer.json); "
                                f"the SD1.x ones are bundled in {BUNDLED_TOKENIZER}")
    tok.model_max_length = MAX_LEN
    if pad_token is not None:
        tok.pad_token = pad_token
    if len(tok) != VOCAB_SIZE:
        raise ValueError(f"tokenizer in {folder} has {len(tok)} entries, expected {VOCAB_SIZE} (CLIP BPE)")
    return tok


def save_tokenizer(tok: CLIPTokenizer, folder: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json, the files SD repositories ship
    (transformers 5 would write only a 3.5 MB tokenizer.json)."""
    import json
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    pad = tok.pad_token or "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_LEN, "pad_token": pad, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return folder


def is_openclip(config) -> bool:
    """An OpenCLIP text tower (SD2.x's ViT-H, SDXL's bigG: GELU) rather than OpenAI's CLIP (quick GELU)."""
    act = config.get("hidden_act") if isinstance(config, dict) else config.hidden_act
    return act == "gelu"


def has_projection(config: dict) -> bool:
    """SDXL's text_encoder_2 (CLIPTextModelWithProjection), by the architecture its config.json names."""
    return "CLIPTextModelWithProjection" in (config.get("architectures") or [])


def build_text_encoder(config: dict) -> CLIPTextModel | CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"})
    cfg._attn_implementation = "sdpa"
    cls = CLIPTextModelWithProjection if has_projection(config) else CLIPTextModel
    cfg.architectures = [cls.__name__]  # written back by save_pretrained-style config dumps
    return cls(cfg).eval()


def _flattened(model: CLIPTextModel) -> bool:
    return not hasattr(model, "text_model")


def to_published(sd: dict, model: CLIPTextModel) -> dict:
    """Our module's state dict -> `text_model.*` names as in published files."""
    return {("text_model." + k if _flattened(model) else k): v for k, v in sd.items()}


def from_published(sd: dict, model: CLIPTextModel) -> dict:
    """Published `text_model.*` names -> this transformers version's names; drops known buffers."""
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    if _flattened(model):
        return {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd


def published_module_names(model: CLIPTextModel):
    """(published dotted name, module) for each submodule: what kohya names `lora_te_<name>`."""
    for name, module in model.named_modules():
        if name:
            yield ("text_model." + name if _flattened(model) else name), module


def _final_layer_norm(model: CLIPTextModel):
    return model.final_layer_norm if _flattened(model) else model.text_model.final_layer_norm


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], long_prompt: str = "truncate") -> torch.Tensor:
    """Prompts -> token ids (B, 77), or (B, 77*k) with long_prompt="chunk"."""
    if long_prompt == "truncate":
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True,
                        return_tensors="pt").input_ids
        for p in prompts:
            body = tokenizer(p, add_special_tokens=False).input_ids
            if len(body) > MAX_LEN - 2:
                warnings.warn(f"prompt longer than {MAX_LEN - 2} tokens truncated; dropped: "
                              f"{tokenizer.decode(body[MAX_LEN - 2:])!r} (set long_prompt=chunk to keep it)")
        return ids
    if long_prompt != "chunk":
        raise ValueError(f"unknown long_prompt {long_prompt!r}: use 'truncate' or 'chunk'")
    body = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    k = max(1, max((len(b) + MAX_LEN - 3) // (MAX_LEN - 2) for b in body))
    rows = []
    for b in body:
        row = []
        for c in range(k):
            piece = b[c * (MAX_LEN - 2):(c + 1) * (MAX_LEN - 2)]
            window = [tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id]
            row += window + [tokenizer.pad_token_id] * (MAX_LEN - len(window))
        rows.append(row)
    return torch.tensor(rows)


def encode_text(model: CLIPTextModel, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Token ids (B, 77*k) -> hidden states (B, 77*k, D), one 77-token window at a time."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (1 = last layer), got {clip_skip}")
    device = next(model.parameters()).device
    outs = []
    for window in ids.to(device).split(MAX_LEN, dim=1):         # each (B, 77)
        out = model(window, output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            h = out.last_hidden_state
        else:
            h = _final_layer_norm(model)(out.hidden_states[-clip_skip])
        outs.append(h)
    return torch.cat(outs, dim=1)
