"""The text side: real CLIP BPE tokenizer, clip-skip, long prompts, published key names."""
import warnings

import pytest
import torch

from conftest import hf_text_encoder
from models import text


def test_bundled_tokenizer_is_real_clip_bpe():
    tok = text.load_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    ids = text.tokenize(tok, ["a photo of a cat"])
    # Ids of OpenAI CLIP's tokenizer for this string (same as open_clip.tokenize): BOS a photo of a cat EOS.
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids.shape == (1, 77) and ids[0, 7:].eq(49407).all()


def test_clip_skip_is_a1111_convention():
    te = hf_text_encoder()
    ids = text.tokenize(text.load_tokenizer(), ["J3NN13, wink, close-up"])
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        assert torch.allclose(text.encode_text(te, ids, clip_skip=1), out.last_hidden_state)
        penult = te.final_layer_norm(out.hidden_states[-2]) if hasattr(te, "final_layer_norm") \
            else te.text_model.final_layer_norm(out.hidden_states[-2])
        got = text.encode_text(te, ids, clip_skip=2)
    assert torch.allclose(got, penult)
    assert not torch.allclose(got, out.last_hidden_state)
    with pytest.raises(ValueError, match="clip_skip"):
        text.encode_text(te, ids, clip_skip=0)


def test_long_prompt_truncates_with_warning_or_chunks():
    tok = text.load_tokenizer()
    long = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = text.tokenize(tok, [long])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert any("dropped" in str(x.message) for x in w)
    chunked = text.tokenize(tok, [long, "short"], long_prompt="chunk")
    n = len(tok(long, add_special_tokens=False).input_ids)
    k = -(-n // 75)
    assert chunked.shape == (2, 77 * k)
    assert chunked[0, ::77].eq(49406).all()  # every window starts with BOS
    body = [t for t in chunked[0].tolist() if t not in (49406, 49407)]
    assert body == tok(long, add_special_tokens=False).input_ids
    te = hf_text_encoder()
    with torch.no_grad():
        emb = text.encode_text(te, chunked)
    assert emb.shape == (2, 77 * k, 32)
    with pytest.raises(ValueError, match="long_prompt"):
        text.tokenize(tok, ["x"], long_prompt="wrap")


def test_published_names_round_trip():
    te = hf_text_encoder()
    pub = text.to_published(te.state_dict(), te)
    assert all(k.startswith("text_model.") for k in pub)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in pub
    pub["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old files carry it
    back = text.from_published(pub, te)
    assert set(back) == set(te.state_dict())
    names = dict(text.published_module_names(te))
    assert "text_model.encoder.layers.0.self_attn.q_proj" in names
