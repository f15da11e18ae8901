"""normalign.build_vlm: a LLaVA-family VLM from tiny CLIP/SigLIP + Llama/Qwen2 parts built offline."""

import math

import pytest
import torch
import transformers as tf
from PIL import Image

import hf_normalign as normalign
from hf_normalign.build import build_from_config
from hf_normalign.testing import tiny_tokenizer

_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32)
_LM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=256,
    bos_token_id=1,
    eos_token_id=2,
)
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat on a bench."}]},
]


def vision_part(kind: str) -> tf.PreTrainedModel:
    torch.manual_seed(1)
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**_VIT, patch_size=8)).eval()
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(**_VIT, patch_size=8)).eval()


def language_part(kind: str) -> tf.PreTrainedModel:
    torch.manual_seed(2)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_LM, pad_token_id=0)).eval()
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LM, tie_word_embeddings=True)).eval()


PAIRS = [("clip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="module", params=PAIRS, ids=["-".join(p) for p in PAIRS])
def built(request):
    vkind, lkind = request.param
    vision, lm = vision_part(vkind), language_part(lkind)
    model, processor = normalign.build_vlm(vision, lm, tokenizer=tiny_tokenizer("llava"))
    return vision, lm, model, processor


def test_parts_are_copied_exactly(built):
    vision, lm, model, _ = built
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_v = vision(pixels, output_hidden_states=True)
        got_v = model.model.vision_tower(pixels, output_hidden_states=True)
        ref_logits, got_logits = lm(input_ids=ids).logits, model(input_ids=ids).logits
    assert all(torch.equal(a, b) for a, b in zip(ref_v.hidden_states, got_v.hidden_states, strict=True))
    assert torch.equal(got_logits[..., : ref_logits.shape[-1]], ref_logits)
    # The caller's modules are copies, not shared with the new model.
    assert model.model.vision_tower is not vision and model.lm_head.weight.data_ptr() != lm.lm_head.weight.data_ptr()


def test_projector_is_fresh_llava15_init_on_penultimate_features(built):
    vision, _, model, _ = built
    proj = model.model.multi_modal_projector
    fan_in = vision.config.hidden_size
    # torch's nn.Linear default (LLaVA-1.5 builds its projector after loading): |w|, |b| <= 1/sqrt(fan_in).
    assert proj.linear_1.weight.abs().max() <= 1 / math.sqrt(fan_in)
    assert proj.linear_1.bias.abs().max() <= 1 / math.sqrt(fan_in)
    assert proj.linear_1.weight.std() > 0.5 / math.sqrt(3 * fan_in)  # uniform, not ~0 or transformers' 0.02
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = vision(pixels, output_hidden_states=True).hidden_states[-2]
        if vision.config.model_type == "clip_vision_model":
            feats = feats[:, 1:]  # "default" strategy drops CLS
        by_hand = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(feats)))
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
    got = torch.cat(list(got)) if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got.reshape(by_hand.shape), by_hand, rtol=0, atol=1e-6)


def test_processor_round_trip_puts_one_token_per_patch(built, tmp_path):
    _, _, model, processor = built
    text = processor.apply_chat_template(MESSAGES)
    assert text.count("<image>") == 1 and "a cat on a bench." in text
    image = Image.new("RGB", (48, 40), (200, 30, 10))
    enc = processor(images=[image], text=[text], return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == (32 // 8) ** 2  # 16 patches, no CLS
    with torch.no_grad():
        logits = model(**enc).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reproc = tf.AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is tf.LlavaForConditionalGeneration and type(reproc) is tf.LlavaProcessor
    enc2 = reproc(images=[image], text=[reproc.apply_chat_template(MESSAGES)], return_tensors="pt")
    assert torch.equal(enc2.input_ids, enc.input_ids) and torch.equal(enc2.pixel_values, enc.pixel_values)
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(reloaded(**enc2).logits, logits)


def test_new_image_token_resizes_embeddings_and_keeps_text_rows():
    lm = language_part("llama")
    model, processor = normalign.build_vlm(
        vision_part("clip"), lm, tokenizer=tiny_tokenizer("llava"), image_token="<im>"
    )
    assert model.config.image_token_id == 256 == processor.tokenizer.convert_tokens_to_ids("<im>")
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 320  # padded to a multiple of 64, as llava-hf does
    assert torch.equal(emb[:256], lm.get_input_embeddings().weight)
    assert processor.image_token == "<im>"


def test_anyres_family_builds_and_counts_tiles():
    model, processor = normalign.build_vlm(
        vision_part("siglip"), language_part("qwen2"), tokenizer=tiny_tokenizer("llava"), family="llava_next"
    )
    assert type(model) is tf.LlavaNextForConditionalGeneration
    enc = processor(images=[Image.new("RGB", (64, 32))], text=["<image> hi"], return_tensors="pt")
    n_tokens = int((enc.input_ids == model.config.image_token_id).sum())
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=enc.pixel_values, image_sizes=enc.image_sizes).pooler_output
    assert n_tokens == sum(f.shape[0] for f in feats)  # what the model scatters, counted by the model
    assert n_tokens > 16  # overview tile + high-res tiles


def test_builds_from_checkpoint_paths(tmp_path):
    # A full CLIP checkpoint (the usual Hub layout), its vision half used; the LLM and tokenizer from a folder.
    clip = tf.CLIPModel(
        tf.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            vision_config=dict(_VIT, patch_size=8),
        )
    ).eval()
    clip.save_pretrained(tmp_path / "clip")
    lm = language_part("llama")
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer("llava").save_pretrained(tmp_path / "lm")
    model, _ = build_from_config(
        {"vision_model": str(tmp_path / "clip"), "language_model": str(tmp_path / "lm"), "dtype": "float32"}
    )
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            model.model.vision_tower(pixels).last_hidden_state, clip.vision_model(pixels).last_hidden_state
        )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.model.language_model.state_dict().values(), lm.model.state_dict().values(), strict=True)
    )


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="family must be one of"):
        normalign.build_vlm(vision_part("clip"), language_part("llama"), family="qwen2_vl")
    with pytest.raises(ValueError, match="projector must be one of"):
        normalign.build_vlm(vision_part("clip"), language_part("llama"), projector="linear")
    with pytest.raises(ValueError, match="needs \\['language_model'\\]"):
        build_from_config({"vision_model": "x"})
    with pytest.raises(ValueError, match="unknown key"):
        build_from_config({"vision_model": "x", "language_model": "y", "projecter": "mlp2x_gelu"})
