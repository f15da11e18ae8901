"""The base class of every diagnostic result: JSON round trip, plain-text table and report columns from one
declaration.

A result is a dataclass of per-layer lists plus scalars and a ``settings`` dict. It declares its per-layer
tables once (:class:`Table` of :class:`Column`); :meth:`Result.format_table` prints them and the HTML report
(:mod:`.report`) draws the same columns. Non-finite floats are written to JSON as the strings "nan", "inf",
"-inf" (strict JSON has no NaN) and read back by :meth:`Result.from_dict` in every field typed with ``float``
or ``Any``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(Result):
    ...     layers: list[int]
    ...     gap: list[float]
    ...     TABLES = (Table("layers", "layer", (Column("gap", "gap", ".2f"),)),)
    >>> d = Demo([1, 2], [0.5, float("inf")])
    >>> d.to_dict()
    {'layers': [1, 2], 'gap': [0.5, 'inf']}
    >>> Demo.from_dict(d.to_dict()) == d
    True
    >>> print(d.format_table())
    layer       gap
    ---------------
        1      0.50
        2       inf
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Column", "Result", "Table", "first_last", "json_float", "mean"]

_NON_FINITE = {"nan", "inf", "-inf"}


def json_float(x: float | None) -> float | str | None:
    """A float for strict JSON: NaN / inf become the strings "nan" / "inf" / "-inf" (``float()`` reads them back).

    Example:
        >>> json_float(float("-inf")), json_float(2.5), json_float(None)
        ('-inf', 2.5, None)
    """
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


def first_last(values: Sequence[float] | None, layers: Sequence[int]) -> tuple[float | None, float | None]:
    """(value at the LLM input, layer 0, if measured; value at the last layer), for a result's summary."""
    if not values:
        return None, None
    return (values[0] if layers[0] == 0 else None), values[-1]


def mean(values: Iterable[float]) -> float:
    """The plain mean of ``values`` (a result's summary)."""
    vals = list(values)
    return sum(vals) / len(vals)


def _encode(value: Any) -> Any:
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass(frozen=True)
class Column:
    """One per-layer quantity: the field holding one value per layer, its heading, its text format."""

    key: str
    header: str
    fmt: str = ".4g"
    report: bool = True  # also a column of the HTML report's table


@dataclass(frozen=True)
class Table:
    """Per-layer columns indexed by the list in field ``index`` (headed ``index_header``)."""

    index: str
    index_header: str
    columns: tuple[Column, ...]


class Result:
    """Base of the diagnostic result dataclasses (:class:`~.metrics.mir.MIRResult`, ``ModalityProfile``,
    ``KeySpaceResult``, ``DegradationResult``). Subclasses are dataclasses that set ``TABLES``."""

    TABLES: ClassVar[tuple[Table, ...]] = ()

    def summary(self) -> dict[str, float | None]:
        """The headline numbers of this result in the report's summary table (None: not measured)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (non-finite floats as strings); :meth:`from_dict` inverts it."""
        return {f.name: _encode(dataclasses.asdict(self)[f.name]) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`: fields typed with ``float`` or ``Any`` get their non-finite strings back."""
        kwargs = dict(data)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in kwargs and ("float" in str(f.type) or "Any" in str(f.type)):
                kwargs[f.name] = _decode(kwargs[f.name])
        return cls(**kwargs)

    def format_table(self) -> str:
        """Plain-text per-layer tables; a column without one value per layer (None, empty) is left out."""
        blocks = []
        for t in self.TABLES:
            n = len(getattr(self, t.index))
            columns = [c for c in t.columns if len(getattr(self, c.key) or ()) == n]
            widths = [max(len(c.header), 8) for c in columns]
            iw = max(5, len(t.index_header))
            head = "  ".join(
                [f"{t.index_header:>{iw}}", *(f"{c.header:>{w}}" for c, w in zip(columns, widths, strict=True))]
            )
            lines = [head, "-" * len(head)]
            for i, index in enumerate(getattr(self, t.index)):
                cells = [format(getattr(self, c.key)[i], c.fmt) for c in columns]
                lines.append("  ".join([f"{index:>{iw}}", *(f"{v:>{w}}" for v, w in zip(cells, widths, strict=True))]))
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
