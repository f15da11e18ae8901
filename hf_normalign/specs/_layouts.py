"""Module layouts shared by several families (paths from the `...ForConditionalGeneration`)."""

# LLaVA, LLaVA-NeXT/OneVision, InternVL, Gemma3, PaliGemma, Mistral3.
LLAVA_STYLE = {
    "projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
    "vision_tower": "model.vision_tower",
}

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the patch merger is the projector.
QWEN_STYLE = {
    "projector": "model.visual.merger",
    "language_model": "model.language_model",
    "vision_tower": "model.visual",
    "video_token_attr": "video_token_id",
}

# Idefics3, SmolVLM: the connector (pixel shuffle + linear) is the projector.
IDEFICS_STYLE = {
    "projector": "model.connector",
    "language_model": "model.text_model",
    "vision_tower": "model.vision_model",
}
