"""The tiny tokenizer: a 256-entry BPE trained in memory, with each family's special tokens at fixed ids."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..specs._tiny import BOS_ID, EOS_ID, PAD_ID, TEXT_ID_RANGE, UNK_ID, VOCAB_SIZE
from .family import recipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_CORPUS = """\
a photo of a cat sitting on a red bench in the park.
the dog runs across the green grass to catch the ball.
two people are walking along the beach at sunset.
describe the image in one sentence.
what color is the car parked next to the house?
there is a small boat on the lake and mountains behind it.
the chart shows the number of visitors per month.
how many apples are on the table? there are three apples.
a man is riding a bicycle down a busy street in the city.
the woman holds an umbrella because it is raining.
answer the question using a single word or phrase.
this picture was taken in the kitchen during the morning.
the text on the sign says stop, please read it aloud.
is there a person in the picture? yes, there is one.
user: what is shown here? assistant: a plate with food.
"""
# Every printable ASCII character (and newline) is a base token, so ordinary text never maps to <unk>.
_ALPHABET = [chr(c) for c in range(33, 127)] + ["\n", "\t", "▁"]
_CHAT_TEMPLATE = (  # "role: text" lines; image parts render as the family's prompt placeholder
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} IMAGE_PLACEHOLDER{% elif part['type'] == 'text' %} {{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_BASE_SPECIALS = {
    "pad_token": ("<pad>", PAD_ID),
    "bos_token": ("<s>", BOS_ID),
    "eos_token": ("</s>", EOS_ID),
    "unk_token": ("<unk>", UNK_ID),
}
_BPE: dict[str, Any] = {}


def _trained_bpe() -> tuple[dict[str, int], list[Any]]:
    """BPE vocab (ids < 200) and merges trained once on ``_CORPUS``."""
    if not _BPE:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=TEXT_ID_RANGE[1],
            special_tokens=[t for t, _ in _BASE_SPECIALS.values()],
            initial_alphabet=_ALPHABET,
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
        model = json.loads(tok.to_str())["model"]
        _BPE.update(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    return _BPE["vocab"], _BPE["merges"]


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A 256-entry fast tokenizer for ``family``, trained in memory on a small English corpus.

    Text pieces use ids 4..199 and the family's special tokens sit at the ids of ``tiny_config(family)``.
    They are also named attributes (``tok.image_token``, ``tok.image_token_id``, ``tok.boi_token`` ...),
    which is what the transformers processors look up. A simple chat template is included::

        tok = tiny_tokenizer("llava")
        tok("a cat <image> on a bench").input_ids  # [1, ..., 250, ...]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny = recipe(family)
    trained, merges = _trained_bpe()
    fixed = {tok: i for tok, i in [*_BASE_SPECIALS.values(), *tiny.specials.values(), *tiny.extra_tokens]}
    by_id = {i: tok for tok, i in fixed.items()}
    # Special tokens live inside the model vocab at their fixed ids, and <unused_k> fills the gaps, so the
    # tokenizer has exactly as many entries as the embedding table.
    vocab = dict(trained)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[by_id.get(i, f"<unused_{i}>")] = i
    if any(vocab.get(tok) != i for tok, i in fixed.items()):
        raise RuntimeError("a special token collides with the trained BPE vocab")

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in fixed])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: tok for name, (tok, _) in _BASE_SPECIALS.items()},
        extra_special_tokens={name: tok for name, (tok, _) in tiny.specials.items()},
        chat_template=_CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", tiny.prompt_image),
    )
    tokenizer.add_bos_token = True
    return tokenizer
