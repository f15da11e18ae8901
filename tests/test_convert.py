"""Issue 23: converting original-format LLaVA-1.5 (+ MoCa) checkpoints, proved against a by-hand forward.

A tiny checkpoint in the LLaVA training repository's layout is written to disk (3 safetensors shards of a
``LlavaLlamaForCausalLM``: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``,
``model.mm_projector.{0,2}``, MoCa at ``model.layers.{i}.modality_layernorm.{scale,shift}``; a CLIP vision tower in
its own folder). ``reference`` computes the original model's forward from those tensors in plain torch (embed,
splice the projected CLIP features at the sentinel, each Llama layer by hand, MoCa after the MLP residual on image
positions in fp32, skipped on one-token steps), never touching hf-normalign's MoCa module. Its ``variant`` argument
gives the four wrong readings of MoCa, which must differ from the converted model.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hf_normalign as normalign
from hf_normalign import cli
from hf_normalign.convert.llava_original import convert
from hf_normalign.testing.llava_original import (
    HEAD_DIM,
    HEADS,
    IMAGE,
    KV_HEADS,
    LAYERS,
    PATCH,
    VOCAB,
    write_original,
)

SENTINEL = -200  # the original's IMAGE_TOKEN_INDEX
N_IMAGE = (IMAGE // PATCH) ** 2
TOL = dict(atol=2e-5, rtol=1e-4)


# --- the original model, by hand -----------------------------------------------------------------------------


def _rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def _rope(x, positions):
    inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _attention(s, i, x, cache, start):
    p = f"model.layers.{i}.self_attn."
    n = x.shape[0]
    positions = torch.arange(start, start + n)
    q = (x @ s[p + "q_proj.weight"].T).view(n, HEADS, HEAD_DIM).transpose(0, 1)
    k = (x @ s[p + "k_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM).transpose(0, 1)
    v = (x @ s[p + "v_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM).transpose(0, 1)
    q, k = _rope(q, positions), _rope(k, positions)
    if i in cache:
        k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
    cache[i] = (k, v)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)
    allowed = torch.arange(k.shape[1])[None, :] <= positions[:, None]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ v).transpose(0, 1).reshape(n, HEADS * HEAD_DIM) @ s[p + "o_proj.weight"].T


def _moca(s, i, h):
    p = f"model.layers.{i}.modality_layernorm."
    return (h.float() * s[p + "scale"].float() + s[p + "shift"].float()).to(h.dtype)


def _layer(s, i, x, image, cache, start, variant):
    p = f"model.layers.{i}."
    h = x + _attention(s, i, _rms(x, s[p + "input_layernorm.weight"]), cache, start)
    y = _rms(h, s[p + "post_attention_layernorm.weight"])
    mlp = (F.silu(y @ s[p + "mlp.gate_proj.weight"].T) * (y @ s[p + "mlp.up_proj.weight"].T)) @ s[
        p + "mlp.down_proj.weight"
    ].T
    if variant == "none":
        return h + mlp
    decode = x.shape[0] == 1
    where = {
        "original": image if not decode else torch.zeros_like(image),
        "before_residual": image if not decode else torch.zeros_like(image),
        "text_positions": torch.ones_like(image) if not decode else torch.zeros_like(image),
        "decode_steps": image if not decode else torch.ones_like(image),
    }[variant][:, None]
    if variant == "before_residual":
        return h + torch.where(where, _moca(s, i, mlp), mlp)
    out = h + mlp
    return torch.where(where, _moca(s, i, out), out)


def _image_features(clip_dir, s, pixel_values):
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        patches = tower(pixel_values, output_hidden_states=True).hidden_states[-2][0, 1:]  # layer -2, no CLS
    x = F.gelu(patches @ s["model.mm_projector.0.weight"].T + s["model.mm_projector.0.bias"])
    return x @ s["model.mm_projector.2.weight"].T + s["model.mm_projector.2.bias"]


def reference(clip_dir, s, ids, pixel_values, steps, variant="original"):
    """Prefill logits of every position and the greedy tokens / logits of ``steps`` generation steps."""
    at = ids.index(SENTINEL)
    text = s["model.embed_tokens.weight"]
    feats = _image_features(clip_dir, s, pixel_values)
    x = torch.cat([text[ids[:at]], feats, text[ids[at + 1 :]]])
    image = torch.zeros(x.shape[0], dtype=torch.bool)
    image[at : at + feats.shape[0]] = True
    cache, start, tokens, step_logits = {}, 0, [], []
    with torch.no_grad():
        for step in range(steps):
            h = x
            for i in range(LAYERS):
                h = _layer(s, i, h, image, cache, start, variant)
            logits = _rms(h, s["model.norm.weight"]) @ s["lm_head.weight"].T
            if step == 0:
                prefill = logits
            start += x.shape[0]
            step_logits.append(logits[-1])
            tokens.append(int(logits[-1].argmax()))
            x, image = text[tokens[-1:]], torch.zeros(1, dtype=torch.bool)
    return prefill, tokens, torch.stack(step_logits)


# --- the converted model -------------------------------------------------------------------------------------

PROMPT = [1, 5, 17, 9, SENTINEL, 33, 41, 7, 12]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src, state = write_original(root)
    out = os.path.join(root, "hf")
    result = convert(src, out)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    return {"root": root, "src": src, "out": out, "state": state, "result": result, "pixels": pixels}


def _inputs(c):
    image_id = c["result"].image_token_id
    ids = [t for token in PROMPT for t in ([image_id] * N_IMAGE if token == SENTINEL else [token])]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def _ours(model, c, steps):
    with torch.no_grad():
        prefill = model(**_inputs(c), pixel_values=c["pixels"]).logits[0, :, :VOCAB]
        out = model.generate(
            **_inputs(c), pixel_values=c["pixels"], max_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, _inputs(c)["input_ids"].shape[1] :].tolist()
    return prefill, tokens, torch.cat(out.logits)[:, :VOCAB]


STEPS = 5


def test_converted_model_equals_the_original_forward(converted):
    """Prefill logits and greedy decoding (4 decode steps after the prefill) equal the by-hand original."""
    c = converted
    model = normalign.from_pretrained(c["out"]).eval()
    assert normalign.get_config(model).methods == ["moca"]
    prefill, tokens, steps = _ours(model, c, STEPS)
    ref_prefill, ref_tokens, ref_steps = reference(
        os.path.join(c["root"], "clip"), c["state"], PROMPT, c["pixels"], len(tokens)
    )
    torch.testing.assert_close(prefill, ref_prefill, **TOL)
    assert tokens == ref_tokens
    torch.testing.assert_close(steps, ref_steps, **TOL)
    # and again after a save / load round trip
    model.save_pretrained(os.path.join(c["root"], "resaved"))
    again = normalign.from_pretrained(os.path.join(c["root"], "resaved")).eval()
    torch.testing.assert_close(_ours(again, c, 1)[0], ref_prefill, **TOL)


@pytest.mark.parametrize("variant", ["before_residual", "text_positions", "decode_steps", "none"])
def test_wrong_readings_of_moca_differ_from_the_converted_model(converted, variant):
    """The comparison above would catch MoCa before the residual, on text positions, on decode steps, or absent."""
    c = converted
    model = normalign.from_pretrained(c["out"]).eval()
    prefill, tokens, steps = _ours(model, c, STEPS)
    wrong_prefill, _, wrong_steps = reference(
        os.path.join(c["root"], "clip"), c["state"], PROMPT, c["pixels"], len(tokens), variant
    )
    gap = max((prefill - wrong_prefill).abs().max(), (steps - wrong_steps).abs().max())
    assert gap > 1e-2, f"{variant} is indistinguishable from the converted model (gap {gap})"


def test_tokenizer_embeddings_and_config(converted):
    from transformers import AutoConfig, AutoTokenizer

    c = converted
    tok = AutoTokenizer.from_pretrained(c["out"])
    config = AutoConfig.from_pretrained(c["out"])
    assert (tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")) == (VOCAB, VOCAB + 1)
    assert (config.image_token_id, config.text_config.pad_token_id, tok.pad_token) == (VOCAB, VOCAB + 1, "<pad>")
    assert config.text_config.vocab_size == 256  # 202 rounded up to a multiple of 64
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    original = AutoTokenizer.from_pretrained(c["src"])
    assert tok("w5 w17 w9").input_ids == original("w5 w17 w9").input_ids
    weights = normalign.from_pretrained(c["out"]).state_dict()
    # the original rows are unchanged; the new ones sit at the old rows' mean (transformers' mean_resizing)
    old = c["state"]["model.embed_tokens.weight"]
    new = weights["model.language_model.embed_tokens.weight"]
    assert torch.equal(new[:VOCAB], old) and torch.equal(
        weights["lm_head.weight"][:VOCAB], c["state"]["lm_head.weight"]
    )
    torch.testing.assert_close(new[VOCAB:], old.mean(0).expand(56, -1), atol=1e-3, rtol=0)


def test_processor_pads_to_a_square_in_the_mean_colour(converted):
    """``image_aspect_ratio: pad``: the original pads with the image processor's mean colour, then resizes."""
    from transformers import AutoProcessor, CLIPImageProcessorPil

    c = converted
    processor = AutoProcessor.from_pretrained(c["out"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 48, 3), dtype=np.uint8))  # wide: pads top and bottom
    clip = CLIPImageProcessorPil.from_pretrained(os.path.join(c["root"], "clip"))
    square = Image.new("RGB", (48, 48), tuple(int(x * 255) for x in clip.image_mean))
    square.paste(image, (0, (48 - 20) // 2))
    expected = clip(square, return_tensors="pt").pixel_values
    inputs = processor(images=image, text="w5 <image> w9", return_tensors="pt")
    # transformers 5.19 rounds a few resized pixels one 8-bit level apart (1/255/std = 0.015); 5.25 is exact
    one_level = 1 / 255 / min(clip.image_std)
    torch.testing.assert_close(inputs.pixel_values, expected, atol=1.01 * one_level, rtol=0)
    black = Image.new("RGB", (48, 48))
    black.paste(image, (0, (48 - 20) // 2))
    assert (inputs.pixel_values - clip(black, return_tensors="pt").pixel_values).abs().max() > 1  # padding matters
    assert int((inputs.input_ids == VOCAB).sum()) == N_IMAGE
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5"}]}], add_generation_prompt=True
    )
    assert prompt.endswith(" USER: <image>\nw5 ASSISTANT:") and prompt.startswith("A chat between")


def test_without_moca_the_output_is_a_plain_checkpoint(tmp_path):
    src, state = write_original(tmp_path, use_moca=False)
    convert(src, tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf" / "normalign_config.json")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    c = {"result": type("R", (), {"image_token_id": VOCAB}), "pixels": pixels}
    ref_prefill, _, _ = reference(str(tmp_path / "clip"), state, PROMPT, pixels, 1, "none")
    torch.testing.assert_close(_ours(model, c, 1)[0], ref_prefill, **TOL)


def test_loading_an_original_folder_says_how_to_convert(tmp_path):
    src, _ = write_original(tmp_path)
    with pytest.raises(normalign.NormAlignCheckpointError, match=r"normalign convert .*original.* OUT"):
        normalign.from_pretrained(src)


def test_bad_sources_get_one_clear_error(tmp_path):
    src, _ = write_original(tmp_path)
    path = tmp_path / "original" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        convert(src, tmp_path / "out")
    path.write_text(json.dumps({**config, "use_moca": False}))
    with pytest.raises(ValueError, match="use_moca: false"):
        convert(src, tmp_path / "out")
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision tower"):
        convert(src, tmp_path / "out", vision_tower=str(tmp_path / "nowhere"))


def test_cli_convert(tmp_path):
    src, _ = write_original(tmp_path)
    assert cli.main(["convert", src, str(tmp_path / "hf"), "--vision-tower", str(tmp_path / "clip")]) == 0
    assert normalign.read_checkpoint_info(tmp_path / "hf").config.methods == ["moca"]
    broken = subprocess.run(
        [sys.executable, "-m", "hf_normalign", "convert", str(tmp_path / "clip"), str(tmp_path / "x")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and "not an original-format LLaVA" in broken.stderr


def test_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """SRC as a Hub id goes through huggingface_hub's snapshot_download: here an offline cache holding the repo."""
    import shutil

    import huggingface_hub

    src, _ = write_original(tmp_path)
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--shikiw--tiny-moca"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert convert("shikiw/tiny-moca", tmp_path / "hf").moca_layers == (0, 1)
    assert normalign.read_checkpoint_info(tmp_path / "hf").config.methods == ["moca"]


def test_a_float16_checkpoint_converts_to_float16_with_fp32_moca(tmp_path):
    src, state = write_original(tmp_path, dtype=torch.float16)
    convert(src, tmp_path / "hf")
    model = normalign.from_pretrained(tmp_path / "hf")
    dtypes = {name.split(".")[1]: p.dtype for name, p in model.named_parameters() if name.startswith("model.")}
    assert dtypes == {
        "vision_tower": torch.float16,
        "multi_modal_projector": torch.float16,
        "language_model": torch.float16,
    }
    assert {p.dtype for p in model.normalign.parameters()} == {torch.float32}
    scale = model.normalign.moca["layer_1_norm"].scale
    assert torch.equal(scale, state["model.layers.1.modality_layernorm.scale"].half().float())  # exact from fp16
