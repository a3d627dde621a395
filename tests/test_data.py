"""Data: folders, caption versions, bad input by name, transforms, buckets, deterministic order, caches."""
import random
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.buckets import BucketBatches, make_buckets, nearest_bucket
from data.cache import LatentCache, TextCache, attach_latent_cache
from data.captions import CaptionError, process_caption
from data.dataset import ImageCaptionDataset, collate
from data.folder import scan_folder
from data.images import BadImageError, load_rgb, resize_crop, to_tensor


def _img(path, size=(40, 30), mode="RGB", color=(200, 10, 10)):
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    (root / "captions" / "v1").mkdir(parents=True)
    (root / "captions" / "v3").mkdir(parents=True)
    for i in range(4):
        _img(root / f"img{i}.png", color=(60 * i, 100, 20))
        (root / f"img{i}.txt").write_text(f"J3NN13, wink, close-up, tag{i}")
        (root / "captions" / "v1" / f"img{i}.txt").write_text("J3NN13")
        (root / "captions" / "v3" / f"img{i}.txt").write_text(f"wink, close-up, make-up, tag{i}\n")
    return root


def test_scan_and_caption_versions(folder):
    items, report = scan_folder(folder)
    assert [i.path.name for i in items] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert items[1].caption == "J3NN13, wink, close-up, tag1" and items[0].size == (40, 30)
    assert scan_folder(folder, caption_version="v1")[0][2].caption == "J3NN13"
    assert scan_folder(folder, caption_version="v3")[0][0].caption == "wink, close-up, make-up, tag0"
    with pytest.raises(FileNotFoundError, match="caption version 'v4'.*versions here: \\['v1', 'v3'\\]"):
        scan_folder(folder, caption_version="v4")
    assert report.images == 4 and report.captioned == 4


def test_missing_captions_policy(folder):
    (folder / "img2.txt").unlink()
    with pytest.raises(CaptionError, match="1 images .* have no caption, e.g. .*img2.txt"):
        scan_folder(folder)
    items, report = scan_folder(folder, missing_caption="trigger", trigger="J3NN13")
    assert report.missing_captions == [str(folder / "img2.txt")] and items[2].caption == ""
    ds = ImageCaptionDataset(items, resolution=16, trigger="J3NN13")
    assert ds.caption_for(2) == "J3NN13"
    with pytest.raises(CaptionError, match="needs data.trigger"):
        scan_folder(folder, missing_caption="trigger")


def test_bad_files_are_named_and_skipped_only_when_asked(folder):
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    good = (folder / "img0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    for n in ("zero", "text", "cut"):
        (folder / f"{n}.txt").write_text("x")
    with pytest.raises(BadImageError, match="2 bad image files") as e:
        scan_folder(folder)
    assert "zero.png: empty file" in str(e.value) and "text.png: not an image" in str(e.value)
    items, report = scan_folder(folder, skip_bad=True)
    assert len(items) == 5 and set(map(lambda p: p.rsplit("/", 1)[1], report.bad_files)) == {"zero.png", "text.png"}
    with pytest.raises(BadImageError, match="cut.png"):  # the header is fine; a full decode finds it
        scan_folder(folder, verify="full", skip_bad=False)
    (folder / "img1.txt").write_bytes(b"J3NN13, \xff\xfe wink")
    with pytest.raises(CaptionError, match="img1.txt: not valid UTF-8"):
        scan_folder(folder, skip_bad=True)
    with pytest.raises(ValueError, match="no images"):
        scan_folder(folder / "captions")


def test_decompression_bomb_and_modes(tmp_path):
    big = _img(tmp_path / "big.png", size=(400, 400))
    with pytest.raises(BadImageError, match="big.png: larger than the 10,000-pixel limit"):
        load_rgb(big, max_pixels=10_000)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    for mode in ("L", "LA", "P", "CMYK"):
        ext = "jpg" if mode == "CMYK" else "png"
        _img(tmp_path / f"m.{ext}", mode=mode)
        assert load_rgb(tmp_path / f"m.{ext}").mode == "RGB"
    arr = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    out = np.asarray(load_rgb(tmp_path / "i16.png"))
    assert out[3, 3, 0] == round(60000 / 65535 * 255)
    # EXIF orientation 6 (rotate 90 CW): a 40x30 image comes out 30x40.
    im = Image.new("RGB", (40, 30))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (30, 40)


def test_resize_crop_flip_tensor():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    out, (top, left) = resize_crop(img, 16, 16)
    assert out.size == (16, 16) and (top, left) == (0, 8)
    t = to_tensor(Image.new("RGB", (2, 1), (255, 255, 255)))
    assert t.shape == (3, 1, 2) and torch.allclose(t, torch.ones_like(t))
    two = Image.new("RGB", (2, 1))
    two.putpixel((0, 0), (255, 255, 255))
    assert to_tensor(two, flip=True)[0, 0].tolist() == [-1.0, 1.0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        resize_crop(Image.new("RGB", (8, 8)), 16, 16)
    assert any("upscaled" in str(x.message) for x in w)


def test_caption_processing():
    rng = random.Random(0)
    assert process_caption("wink, close-up", rng, trigger="J3NN13") == "J3NN13, wink, close-up"
    assert process_caption("J3NN13, wink", rng, trigger="J3NN13") == "J3NN13, wink"
    tags = "J3NN13, " + ", ".join(f"t{i}" for i in range(10))
    shuffled = {process_caption(tags, random.Random(s), shuffle=True, keep_tokens=1) for s in range(20)}
    assert len(shuffled) > 5 and all(c.startswith("J3NN13, ") for c in shuffled)
    assert all(sorted(c.split(", ")) == sorted(tags.split(", ")) for c in shuffled)
    drops = [process_caption("a", random.Random(s), dropout=0.5) for s in range(200)]
    assert 60 < drops.count("") < 140


def test_buckets_and_deterministic_batches():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    bucket_of = [(512, 512)] * 5 + [(640, 384)] * 3
    plan = BucketBatches(bucket_of, batch_size=2, seed=1)
    b0 = plan.batches(0)
    assert sorted(i for b in b0 for i in b) == list(range(8))
    assert all(len({bucket_of[i] for i in b}) == 1 for b in b0)
    assert b0 == BucketBatches(bucket_of, 2, seed=1).batches(0) and b0 != plan.batches(1)
    assert len(plan) == 5 and len(BucketBatches(bucket_of, 2, seed=1, drop_last=True)) == 3


def test_dataset_is_deterministic_per_seed_epoch(folder):
    items, _ = scan_folder(folder)
    ds = ImageCaptionDataset(items, resolution=16, flip_p=0.5, shuffle_tags=True, seed=3)
    a = [ds[i] for i in range(4)]
    b = [ds[i] for i in range(4)]
    assert all(x["caption"] == y["caption"] and x["flip"] == y["flip"] and torch.equal(x["pixels"], y["pixels"])
               for x, y in zip(a, b))
    batch = collate(a)
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].min() >= -1


def test_index_50k_files_in_seconds(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    png = (_img(tmp_path / "one.png", size=(8, 8))).read_bytes()
    for i in range(50_000):
        (root / f"{i:05d}.png").write_bytes(png)
        (root / f"{i:05d}.txt").write_text("a")
    t = time.perf_counter()
    items, report = scan_folder(root)
    elapsed = time.perf_counter() - t
    assert len(items) == 50_000
    assert elapsed < 60, elapsed  # a 2-core CI machine; about 10 s here


class _CountingVAE(torch.nn.Module):
    """A tiny AutoencoderKL stand-in for cache tests: counts encode calls."""

    def __init__(self):
        super().__init__()
        from models.vae import AutoencoderKL, VAEConfig
        self.inner = AutoencoderKL(VAEConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8))
        self.config, self.encoder, self.calls = self.inner.config, self.inner.encoder, 0

    @property
    def dtype(self):
        return torch.float32

    def encode(self, x):
        self.calls += x.shape[0]
        self.batches = getattr(self, "batches", []) + [x.shape[0]]
        return self.inner.encode(x)


def test_latent_cache_keys_memory_and_disk(folder, tmp_path):
    items, _ = scan_folder(folder)
    ds = ImageCaptionDataset(items, resolution=16, flip_p=0.5)
    vae = _CountingVAE()
    cache = LatentCache(vae, tmp_path / "cache")
    attach_latent_cache(ds, cache)
    assert vae.calls == 8  # 4 images x 2 flips
    s = ds[0]
    assert "pixels" not in s and s["latent_mean"].shape == (4, 16, 16)
    want = vae.inner.encode(ds.pixels(0, s["flip"])[None]).mean[0]
    assert torch.allclose(s["latent_mean"], want, atol=1e-5)  # batched vs single conv: last bits differ
    # A second cache on the same disk folder recomputes nothing; a changed image or VAE recomputes.
    again = LatentCache(vae, tmp_path / "cache")
    assert again.fill(ds) == 0
    _img(folder / "img1.png", color=(1, 2, 3))
    assert LatentCache(vae, tmp_path / "cache").fill(ds) == 2
    with torch.no_grad():
        vae.inner.encoder.conv_in.weight.add_(0.1)
    assert LatentCache(vae, tmp_path / "cache").fill(ds) == 8
    with pytest.raises(ValueError, match="crop=center"):
        LatentCache(vae).fill(ImageCaptionDataset(items, resolution=16, crop="random"))


def test_latent_cache_splits_batches_by_pixels(folder):
    """At most batch_pixels half-precision pixels per VAE call, fp32 counting twice (SDXL's fp32 VAE at 1024x1024:
    one image per call), the same latents as whole batches."""
    items, _ = scan_folder(folder)
    ds = ImageCaptionDataset(items, resolution=16, flip_p=0.5)
    whole, split = _CountingVAE(), _CountingVAE()
    split.load_state_dict(whole.state_dict())
    a, b = LatentCache(whole), LatentCache(split, batch_pixels=3 * 16 * 16)   # fp32: 3 * 2 / 4 -> 1 per call
    a.fill(ds), b.fill(ds)
    assert whole.batches == [8] and split.batches == [1] * 8, (whole.batches, split.batches)
    for i in range(len(ds)):
        for flip in (False, True):
            (m1, s1), (m2, s2) = a.get(ds, i, flip), b.get(ds, i, flip)
            assert torch.allclose(m1, m2, atol=1e-5) and torch.allclose(s1, s2, atol=1e-5)
    c = LatentCache(_CountingVAE(), batch_pixels=4 * 16 * 16)                # 4 * 2 / 4 -> 2 per call
    c.fill(ds)
    assert c.vae.batches == [2] * 4


def test_text_cache_encodes_each_caption_once():
    seen = []

    def enc(caps):
        seen.extend(caps)
        return {"ctx": torch.stack([torch.full((2, 3), float(len(c))) for c in caps]),
                "pooled": torch.tensor([[float(len(c))] for c in caps])}  # (SDXL's second output)
    tc = TextCache(enc)
    out = tc(["ab", "abc", "ab"])
    assert out["ctx"].shape == (3, 2, 3) and out["ctx"][1, 0, 0] == 3
    assert out["pooled"][:, 0].tolist() == [2.0, 3.0, 2.0]
    tc(["abc", "abcd"])
    assert seen == ["ab", "abc", "abcd"]  # each caption encoded once


def test_data_check_reports_everything(folder, capsys):
    from data.check import main
    assert main([str(folder)]) == 0
    (folder / "dup.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "broken.png").write_text("not an image")
    (folder / "captions" / "v1" / "img2.txt").unlink()
    assert main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert "6 images, 5 readable" in out and "dup.png, img0.png" in out and "broken.png: not an image" in out
    assert "v1: 3/5" in out and "default: 4/5" in out


def test_class_images_are_generated_to_the_count(tiny_diffusers_folder, tmp_path):
    from data.class_images import ensure_class_images
    from models.load import load_model
    sd = load_model(tiny_diffusers_folder)
    cls = tmp_path / "class"
    cls.mkdir()
    _img(cls / "real.png", size=(16, 16))
    (cls / "real.txt").write_text("a person")
    assert ensure_class_images(sd, cls, "a person", 4, size=16, steps=2) == 3
    items, _ = scan_folder(cls)
    assert len(items) == 4 and all(i.caption == "a person" for i in items)
    assert ensure_class_images(sd, cls, "a person", 4, size=16, steps=2) == 0


@pytest.fixture
def tiny_blip(tmp_path):
    """A tiny random BLIP captioner in the layout of Salesforce/blip-image-captioning-base."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "person", "with", "glasses", "smiling", "photo",
             "of", "hair", "[DEC]"]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    cfg = BlipConfig(text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, bos_token_id=13, sep_token_id=3, pad_token_id=0,
                                      max_position_embeddings=64),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                         tokenizer=BertTokenizer(str(tmp_path / "vocab.txt")))
    model.save_pretrained(tmp_path / "blip")
    proc.save_pretrained(tmp_path / "blip")
    return tmp_path / "blip", model, proc


def test_caption_folder_with_a_tiny_blip(folder, tiny_blip):
    from data.caption import caption_folder, main
    path, model, proc = tiny_blip
    r = caption_folder(folder, path, version="blip", prefix="J3NN13, ", batch=3, max_new_tokens=5)
    assert r == {"images": 4, "written": 4, "kept": 0, "folder": str(folder / "captions" / "blip")}
    img = load_rgb(folder / "img2.png")
    with torch.no_grad():
        want = proc.batch_decode(model.generate(**proc(images=[img], return_tensors="pt"), max_new_tokens=5,
                                                do_sample=False), skip_special_tokens=True)[0].strip()
    assert (folder / "captions" / "blip" / "img2.txt").read_text() == f"J3NN13, {want}\n"
    assert scan_folder(folder, caption_version="blip")[0][0].caption.startswith("J3NN13, ")
    # Existing captions are kept unless overwrite=true; the default location is beside the images.
    assert caption_folder(folder, path, version="blip")["written"] == 0
    assert main([str(folder), f"model={path}", "overwrite=true", "max_new_tokens=3"]) == 0
    assert (folder / "img0.txt").read_text() != "J3NN13, wink, close-up, tag0"
    with pytest.raises(FileNotFoundError, match="no captioning model"):
        caption_folder(folder, folder / "nope")


@pytest.fixture
def tiny_llava(tmp_path):
    """A tiny random LLaVA (CLIP vision tower + Llama text model) in the layout of llava-hf/llava-1.5-7b-hf;
    its tokenizer is the bundled CLIP BPE plus the <image> token."""
    from transformers import (CLIPImageProcessor, CLIPTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from models.text import BUNDLED_TOKENIZER
    tok = CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    tok.add_tokens(["<image>"], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    model.save_pretrained(tmp_path / "llava")
    proc.save_pretrained(tmp_path / "llava")
    return tmp_path / "llava", model, proc


def test_caption_folder_with_a_tiny_llava(folder, tiny_llava):
    """Batched LLaVA captions equal one-image-at-a-time generation, keeping only the answer (no prompt)."""
    from transformers import AutoProcessor

    from data.caption import LLAVA_PROMPT, caption_folder
    path, model, _ = tiny_llava
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)   # as the captioner loads it
    r = caption_folder(folder, path, version="llava", prefix="J3NN13, ", batch=3, max_new_tokens=6)
    assert r["written"] == 4
    for name in ("img0", "img3"):
        inputs = proc(images=[load_rgb(folder / f"{name}.png")], text=[LLAVA_PROMPT], return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0]
        prompt_len = inputs["input_ids"].shape[1]
        want = proc.tokenizer.decode(seq[prompt_len:], skip_special_tokens=True).strip()
        got = (folder / "captions" / "llava" / f"{name}.txt").read_text()
        assert got == f"J3NN13, {want}\n" and want and "ASSISTANT" not in got and "Describe" not in got
