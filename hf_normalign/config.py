"""Configuration dataclasses: one per method, and `NormAlignConfig` that combines them.

Every config round-trips through JSON with `to_dict` / `from_dict`; `from_dict` rejects unknown
keys so that a checkpoint written by a newer release fails loudly instead of loading half-set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal


def _from_dict(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict takes a dict of settings, got {data!r} ({type(data).__name__}).")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{cls.__name__} got unknown keys {unknown}; valid keys are {sorted(names)}. "
            "The config was probably written by a newer hf-normalign: upgrade it."
        )
    return cls(**data)


# --- field checks: every config field is validated here, on construction and so also in from_dict ---------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):  # "no" or 0 would silently read as a truth value
        raise TypeError(f"{owner}.{name} must be true or false, got {value!r} ({type(value).__name__}).")


def _check_number(owner: str, name: str, value: Any, *, minimum: float, strict: bool, optional: bool = False) -> None:
    """A finite real number above ``minimum`` (``strict``) or at least ``minimum``; None when ``optional``."""
    if value is None and optional:
        return
    allowed = f"a finite number {'>' if strict else '>='} {minimum}" + (" or null" if optional else "")
    if not _is_number(value):
        raise TypeError(f"{owner}.{name} must be {allowed}, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}.")


def _check_index(owner: str, name: str, value: Any, *, optional: bool = True) -> None:
    """A decoder-layer index or width: an int >= 0 (bools and floats refused); None when ``optional``."""
    if value is None and optional:
        return
    allowed = "an int >= 0" + (" or null" if optional else "")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be {allowed}, got {value!r} ({type(value).__name__}).")
    if value < 0:
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}.")


@dataclass
class ProjectorNormConfig:
    """LayerNorm on the projector output, gain initialised to the text-embedding scale, plus GWC.

    Args:
        gwc: Global Weight Compensation: in training, scale the gradient reaching the projector by
            ``1 / max(mean|gain|, gwc_floor)`` so the small gain does not starve it.
        target_norm: the norm ``T`` vision tokens start at; ``None`` measures the mean L2 norm of the
            non-zero rows of the input embedding as the LLM receives it.
        gwc_floor: lower bound of ``mean|gain|`` in the GWC factor.
        eps: LayerNorm epsilon.
        deepstack: Qwen3-VL only: also normalise the deepstack mergers' outputs, which are added to
            the vision positions after the first decoder layers (each gets its own LayerNorm).

    Example:
        >>> ProjectorNormConfig(gwc=False, target_norm=1.0)
        ProjectorNormConfig(gwc=False, target_norm=1.0, gwc_floor=0.001, eps=1e-05, deepstack=True)
    """

    TITLE: ClassVar[str] = "Projector LayerNorm + GWC (arXiv 2512.08374)"
    NONE_MEANS: ClassVar[dict[str, str]] = {"target_norm": "measured: mean text-embedding norm"}

    gwc: bool = True
    target_norm: float | None = None
    gwc_floor: float = 1e-3
    eps: float = 1e-5
    deepstack: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_bool(owner, "gwc", self.gwc)
        _check_number(owner, "target_norm", self.target_norm, minimum=0, strict=True, optional=True)
        _check_number(owner, "gwc_floor", self.gwc_floor, minimum=0, strict=True)
        _check_number(owner, "eps", self.eps, minimum=0, strict=True)
        _check_bool(owner, "deepstack", self.deepstack)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectorNormConfig:
        return _from_dict(cls, data)


@dataclass
class MoCaConfig:
    """MoCa: a learnable ``h <- u * h + v`` on vision positions at the end of decoder layers.

    Args:
        init_std: 0 gives the identity (u = 1, v = 0); otherwise u ~ N(1, s), v ~ N(0, s).
        layers: decoder layer indices to calibrate; ``None`` means every layer.
    """

    TITLE: ClassVar[str] = "MoCa, modality calibration (arXiv 2410.07167)"
    NONE_MEANS: ClassVar[dict[str, str]] = {"layers": "all decoder layers"}

    init_std: float = 0.0
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_number(owner, "init_std", self.init_std, minimum=0, strict=False)
        if self.layers is None:
            return
        # A string is iterable too: "01" must not become layers [0, 1].
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise TypeError(
                f"{owner}.layers must be a non-empty list of decoder-layer indices (ints >= 0) or null for every "
                f"layer, got {self.layers!r} ({type(self.layers).__name__})."
            )
        for index in self.layers:
            _check_index(owner, "layers[...]", index, optional=False)
        self.layers = sorted(set(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoCaConfig:
        return _from_dict(cls, data)


@dataclass
class PReConfig:
    """PRe: an auxiliary loss making decoder layer ``layer`` predict the LLM-input vision embeddings.

    Args:
        layer: 0-based index of the decoder layer whose output feeds the head: module
            ``layers[layer]``, whose output is ``hidden_states[layer + 1]``, i.e. what the diagnostics
            (1-based, numbered like ``hidden_states``) call layer ``layer + 1``. ``None`` means
            ``num_layers // 2``. For the paper's wording ("layer 16 of 32", counted from 1 like the
            diagnostics) use :meth:`from_paper_layer`: ``PReConfig.from_paper_layer(16)`` gives
            ``layer=15``, the output of the 16th decoder layer.
        weight: lambda in ``loss = LM + lambda * PRe``.
        head_hidden_size: hidden width of the 2-layer head; ``None`` means the LLM hidden size.
        anchor: ``"llm_input"`` (the vision embeddings as they enter the LLM, after the projector
            and its LayerNorm) or ``"encoder_output"`` (the projector input; ablation).
    """

    TITLE: ClassVar[str] = "PRe, predictive regularization (arXiv 2603.20808)"
    NONE_MEANS: ClassVar[dict[str, str]] = {
        "layer": "middle layer (num_layers // 2)",
        "head_hidden_size": "LLM hidden size",
    }

    ANCHORS: ClassVar[tuple[str, ...]] = ("llm_input", "encoder_output")
    LAYER_NUMBERING: ClassVar[str] = "0-based decoder-layer index; its output is hidden_states[layer + 1]"

    layer: int | None = None
    weight: float = 0.5
    head_hidden_size: int | None = None
    anchor: Literal["llm_input", "encoder_output"] = "llm_input"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_index(owner, "layer", self.layer)
        _check_number(owner, "weight", self.weight, minimum=0, strict=False)
        _check_index(owner, "head_hidden_size", self.head_hidden_size)
        if self.head_hidden_size == 0:
            raise ValueError(f"{owner}.head_hidden_size must be a positive int or null, got 0.")
        if self.anchor not in self.ANCHORS:
            raise ValueError(f"{owner}.anchor must be one of {self.ANCHORS}, got {self.anchor!r}.")

    @classmethod
    def from_paper_layer(cls, paper_layer: int, **kwargs: Any) -> PReConfig:
        """Config for the paper's 1-based layer number (16 of 32 for Vicuna-7B): ``layer = paper_layer - 1``.

        Example:
            >>> PReConfig.from_paper_layer(16).layer
            15
        """
        if paper_layer < 1:
            raise ValueError(f"paper layers are counted from 1, got {paper_layer}")
        return cls(layer=paper_layer - 1, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        # The saved config says how ``layer`` is counted; from_dict drops the note.
        return dataclasses.asdict(self) | {"layer_numbering": self.LAYER_NUMBERING}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PReConfig:
        if not isinstance(data, dict):
            return _from_dict(cls, data)  # its error
        # The note is checked, not just dropped: another text means `layer` was counted another way.
        note = data.get("layer_numbering", cls.LAYER_NUMBERING)
        if note != cls.LAYER_NUMBERING:
            raise ValueError(
                f"PReConfig.layer_numbering is {note!r}, but this release counts `layer` as {cls.LAYER_NUMBERING!r}: "
                "the config was written with another numbering. Set `layer` for this numbering "
                "(PReConfig.from_paper_layer converts the paper's 1-based count) and re-save."
            )
        return _from_dict(cls, {k: v for k, v in data.items() if k != "layer_numbering"})


# Method name -> its config class; each class carries TITLE and NONE_MEANS (read by the Hub model card). The
# order is the order the methods act in at a decoder layer (MoCa before PRe), and `hf_normalign.methods.<name>`
# is each method's module.
METHOD_CONFIGS: dict[str, type] = {
    "projector_norm": ProjectorNormConfig,
    "moca": MoCaConfig,
    "pre": PReConfig,
}
METHODS: tuple[str, ...] = tuple(METHOD_CONFIGS)


@dataclass
class NormAlignConfig:
    """Which interventions to apply, each ``False`` (off), ``True`` (defaults) or its own config.

    Example:
        >>> cfg = NormAlignConfig(projector_norm=True, moca=MoCaConfig(layers=[0, 1]))
        >>> cfg.methods
        ['projector_norm', 'moca']
        >>> NormAlignConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    projector_norm: ProjectorNormConfig | bool | None = None
    moca: MoCaConfig | bool | None = None
    pre: PReConfig | bool | None = None

    def __post_init__(self) -> None:
        for name, cls in METHOD_CONFIGS.items():
            value = getattr(self, name)
            if value is True:
                value = cls()
            elif value is False or value is None:
                value = None
            elif isinstance(value, dict):
                value = cls.from_dict(value)
            elif not isinstance(value, cls):
                raise TypeError(
                    f"NormAlignConfig.{name} must be true, false, null, a {cls.__name__} or its dict, got {value!r} "
                    f"({type(value).__name__})."
                )
            setattr(self, name, value)

    @classmethod
    def from_methods(cls, methods: str | list[str] | tuple[str, ...], **overrides: Any) -> NormAlignConfig:
        """Build a config from method names; ``overrides`` may pass a method's own config."""
        if not isinstance(methods, (str, list, tuple)):
            raise TypeError(f"methods must be a method name or a list of them ({list(METHODS)}), got {methods!r}.")
        names = [methods] if isinstance(methods, str) else list(methods)
        if not names:
            raise ValueError(f"The method list is empty: nothing would be patched. Pass any of {list(METHODS)}.")
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; the methods are {list(METHODS)}.")
        bad = sorted(set(overrides) - set(METHODS))
        if bad:
            raise ValueError(f"Unknown override(s) {bad}; pass configs for {list(METHODS)}.")
        kwargs: dict[str, Any] = {m: True for m in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if getattr(self, m) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {m: (getattr(self, m).to_dict() if getattr(self, m) is not None else None) for m in METHODS}

    @classmethod
    def from_dict(cls, data: Any) -> NormAlignConfig:
        if not isinstance(data, dict):
            raise TypeError(f"NormAlignConfig.from_dict takes a dict of methods, got {data!r} ({type(data).__name__}).")
        unknown = sorted(set(data) - set(METHODS))
        if unknown:
            raise ValueError(
                f"NormAlignConfig got unknown methods {unknown}; known: {list(METHODS)}. "
                "The config was probably written by a newer hf-normalign: upgrade it."
            )
        return cls(**{m: data.get(m) for m in METHODS})
