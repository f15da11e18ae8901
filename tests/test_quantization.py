"""bitsandbytes 4-bit / 8-bit: skip list, fp32 plugin inside a quantised model, QLoRA preparation.

Quantised models are built the way users get them: a tiny model saved with `save_pretrained` and
reloaded with `from_pretrained(..., quantization_config=...)`. bitsandbytes 0.50 runs 4-bit and
8-bit on CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from conftest import REQUIRED_FAMILIES
from torch import nn
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

import hf_normalign as normalign
from hf_normalign.patching import get_plugin
from hf_normalign.quantization import bnb_config, prepare_for_kbit_training, quantization_skip_modules
from hf_normalign.registry import get_spec
from hf_normalign.testing import tiny_batch, tiny_config, tiny_model

ALL_METHODS = ["projector_norm", "moca", "pre"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(family)`: directory of a saved fp32 `tiny_model(family)` (seed 0), built once."""
    saved = {}

    def get(family: str):
        if family not in saved:
            saved[family] = tmp_path_factory.mktemp(family)
            tiny_model(family).save_pretrained(saved[family])
        return saved[family]

    return get


def load(path, quantization_config, dtype=None, device_map="cpu"):
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForImageTextToText.from_pretrained(
        path, quantization_config=quantization_config, device_map=device_map, **kwargs
    )


def linear_types(model, prefix: str) -> set[type]:
    """Types of the Linear modules at `prefix` or under it."""
    return {
        type(m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (name == prefix or name.startswith(prefix + "."))
    }


def train_step(model, batch, params, lr=1e-3):
    """One Adam step over `params`; returns the model output."""
    opt = torch.optim.Adam(params, lr=lr)
    out = model(**batch)
    out.loss.backward()
    opt.step()
    return out


def assert_plugin_step(model, batch):
    """A training step updates every plugin parameter; params and grads are finite fp32."""
    plugin = get_plugin(model)
    before = {n: p.detach().clone() for n, p in plugin.named_parameters()}
    model.train()
    out = train_step(model, batch, list(plugin.parameters()))
    assert torch.isfinite(out.loss) and torch.isfinite(out.pre_loss) and out.pre_loss > 0
    for name, param in plugin.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
        assert not torch.equal(param.detach(), before[name]), f"{name} was not updated"


# --- the skip list ---------------------------------------------------------------------------------


def test_skip_modules_are_full_paths_with_lm_head():
    assert quantization_skip_modules(tiny_config("llava")) == [
        "lm_head",
        "model.vision_tower",
        "model.multi_modal_projector",
    ]
    assert quantization_skip_modules(tiny_config("qwen3_vl")) == [
        "lm_head",
        "model.visual",
        "model.visual.merger",
        "model.visual.deepstack_merger_list",
    ]
    # a model gives the same list as its config; None covers every required family
    assert quantization_skip_modules(tiny_model("internvl")) == quantization_skip_modules(tiny_config("internvl"))
    union = quantization_skip_modules()
    for family in REQUIRED_FAMILIES:
        assert set(quantization_skip_modules(tiny_config(family))) <= set(union), family


def test_bnb_config():
    cfg = bnb_config(4, tiny_config("llava"), compute_dtype=torch.float16, llm_int8_skip_modules=["extra", "lm_head"])
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_compute_dtype, cfg.bnb_4bit_use_double_quant) == (
        "nf4",
        torch.float16,
        True,
    )
    # a user skip list is added to ours, not swapped in for it
    assert cfg.llm_int8_skip_modules == ["lm_head", "model.vision_tower", "model.multi_modal_projector", "extra"]
    cfg8 = bnb_config(8, tiny_config("qwen2_vl"), llm_int8_threshold=5.0)
    assert cfg8.load_in_8bit and not cfg8.load_in_4bit and cfg8.llm_int8_threshold == 5.0
    assert cfg8.llm_int8_skip_modules == ["lm_head", "model.visual", "model.visual.merger"]
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        bnb_config(3)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_skip_list_keeps_vision_tower_and_projector_unquantised(family, checkpoint):
    spec = get_spec(tiny_config(family))
    # built from the config alone, before any model exists
    model = load(checkpoint(family), bnb_config(4, tiny_config(family)))
    kept = [spec.vision_tower, spec.projector, *spec.extra_projectors]
    for path in kept:
        types = linear_types(model, path)
        assert types and Linear4bit not in types, (path, types)
    assert linear_types(model, spec.language_model) == {Linear4bit}
    assert type(model.get_submodule(spec.lm_head)) is nn.Linear

    # The vision side is bit-identical to the fp32 model: its projector output is unchanged,
    # while the quantised LLM's logits are not.
    reference = tiny_model(family)
    batch = tiny_batch(reference)
    outputs = []
    for m in (reference, model):
        captured = []
        handle = spec.get(m, spec.projector).register_forward_hook(lambda mod, args, out, c=captured: c.append(out))
        with torch.no_grad():
            outputs.append((captured, m(**batch).logits))
        handle.remove()
    (ref_proj, ref_logits), (q_proj, q_logits) = outputs
    assert torch.equal(q_proj[0], ref_proj[0])
    assert torch.isfinite(q_logits).all() and not torch.equal(q_logits, ref_logits)


@pytest.mark.parametrize(
    ("skip", "projector_quantised", "lm_head_quantised"),
    [
        (None, True, False),  # transformers' default list is only lm_head: the vision side is quantised
        (["multi_modal_projector"], True, True),  # bare name: matches no Linear; replaces the default list
        (["model.multi_modal_projector"], False, True),  # full path: projector kept, lm_head still lost
    ],
)
def test_transformers_skip_list_traps(skip, projector_quantised, lm_head_quantised, checkpoint):
    """What transformers 5.23 does with hand-written skip lists (the traps `bnb_config` avoids)."""
    model = load(checkpoint("llava"), BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip))
    assert (Linear4bit in linear_types(model, "model.multi_modal_projector")) == projector_quantised
    assert (type(model.lm_head) is Linear4bit) == lm_head_quantised
    assert Linear4bit in linear_types(model, "model.vision_tower")  # listed in none of these


# --- training the plugin in a quantised model -------------------------------------------------------

QUANT_CASES = {
    "nf4-fp32": (4, None),
    "nf4-bf16": (4, torch.bfloat16),
    "nf4-fp16": (4, torch.float16),
    "int8-fp16": (8, torch.float16),
}


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantised_training_step_updates_every_plugin_param(case, checkpoint):
    bits, dtype = QUANT_CASES[case]
    cfg = tiny_config("llava")
    model = load(checkpoint("llava"), bnb_config(bits, cfg, compute_dtype=dtype or torch.float32), dtype=dtype)
    assert Linear4bit in linear_types(model, "model.language_model") or Linear8bitLt in linear_types(
        model, "model.language_model"
    )
    normalign.patch(model, methods=ALL_METHODS)
    if dtype == torch.float16:
        normalign.set_loss_scaler(model, None)  # this step does not scale the loss
    batch = tiny_batch(model)
    assert_plugin_step(model, batch)
    assert model(**batch).logits.dtype == (dtype or torch.float32)


@pytest.mark.parametrize(("bits", "dtype"), [(4, torch.bfloat16), (8, torch.float16)])
def test_plugin_computes_in_fp32_and_casts_back(bits, dtype, checkpoint):
    """Projector LayerNorm and MoCa run in fp32 on low-precision activations and return their dtype."""
    model = load(checkpoint("llava"), bnb_config(bits, tiny_config("llava"), compute_dtype=dtype), dtype=dtype)
    seen = {}
    # registered before `patch`, so it sees the projector output before the LayerNorm
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.__setitem__("proj", out))
    normalign.patch(model, methods=["projector_norm", "moca"])
    plugin = get_plugin(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in plugin.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    layer = model.model.language_model.layers[0]
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("pre_moca", out), prepend=True)
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("post_moca", out))
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True
    )
    batch = tiny_batch(model)
    with torch.no_grad():
        model(**batch)
    mask = batch["input_ids"] == model.config.image_token_id
    hidden = model.config.text_config.hidden_size

    norm = plugin.projector_norm[0]
    assert seen["proj"].dtype == dtype and seen["embeds"].dtype == dtype
    expected = (F.layer_norm(seen["proj"].float(), (hidden,), eps=norm.eps) * norm.weight + norm.bias).to(dtype)
    assert torch.equal(seen["embeds"][mask], expected.reshape(-1, hidden))

    moca = plugin.moca["layer_0_norm"]
    before, after = (seen[k][0] if isinstance(seen[k], tuple) else seen[k] for k in ("pre_moca", "post_moca"))
    assert after.dtype == dtype
    assert torch.equal(after[mask], (before[mask].float() * moca.scale + moca.shift).to(dtype))
    assert torch.equal(after[~mask], before[~mask])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # 5.24 renames gradient -> activation checkpointing
@pytest.mark.parametrize("gc_kwargs", [None, {"use_reentrant": False}])
def test_prepare_for_kbit_training_keeps_plugin_trainable(gc_kwargs, checkpoint):
    model = load(checkpoint("llava"), bnb_config(4, tiny_config("llava")), dtype=torch.bfloat16)
    normalign.patch(model, methods=ALL_METHODS)
    model = prepare_for_kbit_training(model, gradient_checkpointing_kwargs=gc_kwargs)
    plugin_ids = {id(p) for p in get_plugin(model).parameters()}
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) in plugin_ids), name
    assert all(p.dtype == torch.float32 for p in get_plugin(model).parameters())
    assert model.is_gradient_checkpointing  # the 5.17 name; 5.24 also has is_activation_checkpointing

    # Under gradient checkpointing the plugin gets the same gradients as without it.
    batch = tiny_batch(model)
    model.train()
    model(**batch).loss.backward()
    with_gc = {n: p.grad.clone() for n, p in get_plugin(model).named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_disable()
    model(**batch).loss.backward()
    for name, param in get_plugin(model).named_parameters():
        torch.testing.assert_close(param.grad, with_gc[name], msg=name)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    assert_plugin_step(model, batch)


def test_plain_peft_preparation_freezes_the_plugin(checkpoint):
    """Why `prepare_for_kbit_training` exists; and it refuses an already-wrapped PEFT model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load(checkpoint("llava"), bnb_config(4, tiny_config("llava")))
    normalign.patch(model, methods=["projector_norm"])
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in get_plugin(model).parameters())
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before peft.get_peft_model"):
        prepare_for_kbit_training(peft_model)


# --- CUDA -----------------------------------------------------------------------------------------------


def cuda_batch(model):
    return {k: v.to("cuda") for k, v in tiny_batch(model).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_training_step_cuda(bits, checkpoint):
    model = load(checkpoint("llava"), bnb_config(bits, tiny_config("llava")), dtype=torch.bfloat16, device_map={"": 0})
    normalign.patch(model, methods=ALL_METHODS)
    model = prepare_for_kbit_training(model)
    assert all(p.is_cuda for p in get_plugin(model).parameters())
    assert_plugin_step(model, cuda_batch(model))


@pytest.mark.gpu
def test_bf16_training_step_cuda():
    model = tiny_model("qwen2_vl", dtype=torch.bfloat16).to("cuda")
    normalign.patch(model, methods=ALL_METHODS)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in get_plugin(model).parameters())
    batch = cuda_batch(model)
    assert_plugin_step(model, batch)
    assert model(**batch).logits.dtype == torch.bfloat16


def _use_packed_cpu_kernel(model: nn.Module, packed: bool) -> None:
    # bitsandbytes picks its CPU 4-bit kernel per module from the CPU's features (AVX512-BF16: weights repacked
    # on the first eval forward); setting the flag runs either path on a CPU that has the feature.
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = packed


@pytest.mark.parametrize("packed", [False, True])
def test_plugin_works_on_both_bitsandbytes_cpu_4bit_kernels(packed, checkpoint):
    from bitsandbytes.functional import has_avx512bf16

    if packed and not has_avx512bf16():
        pytest.skip("bitsandbytes' packed-weight 4-bit CPU kernel needs AVX512-BF16, which this CPU lacks")
    quant = bnb_config(4, tiny_config("llava"), compute_dtype=torch.bfloat16)
    model = load(checkpoint("llava"), quant, dtype=torch.bfloat16)
    unpatched = load(checkpoint("llava"), quant, dtype=torch.bfloat16)
    normalign.patch(model, methods=["projector_norm", "moca"], moca=normalign.MoCaConfig(init_std=0.3))
    # The same calibration by hand on the unpatched model: LayerNorm after the projector, u*h+v after each layer.
    plugin = get_plugin(model)
    mask = tiny_batch(model, with_labels=False)["input_ids"] == model.config.image_token_id
    unpatched.model.multi_modal_projector.register_forward_hook(
        lambda m, a, out: plugin.projector_norm[0](out.float()).to(out.dtype)
    )
    for i, layer in enumerate(unpatched.model.language_model.layers):
        moca = plugin.moca[f"layer_{i}_norm"]
        layer.register_forward_hook(
            lambda m, a, out, moca=moca: torch.where(
                mask[..., None], (out.float() * moca.scale + moca.shift).to(out.dtype), out
            )
        )
    for m in (model, unpatched):
        _use_packed_cpu_kernel(m, packed)
    batch = tiny_batch(model, with_labels=False)
    with torch.no_grad():
        got, expected = model(**batch).logits, unpatched(**batch).logits
    packed_weights = any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, Linear4bit)
    )
    assert packed_weights == packed
    assert torch.equal(got, expected)
    assert {p.dtype for p in plugin.parameters()} == {torch.float32}
