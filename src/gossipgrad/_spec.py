"""How an option is defined: the values it allows (``Allowed``), its help text and its
command-line form (``Option``, a dataclass field's metadata), and the messages and table rows
made from them. The gossip engine's options (``gossipgrad.options``) and ``gossipgrad train``'s
own (``gossipgrad.train.config``) are both defined this way. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass
from typing import Any

_NOUNS = {"int": "an integer", "float": "a finite number"}
_INT64_MAX = 2**63 - 1  # shown as such in messages


@dataclass(frozen=True)
class Allowed:
    """The values an option allows: of its type (``bool``; ``int``; ``float``: finite; ``str``;
    another type is left to ``check``), within the bounds given (``low <= v``, ``above < v``,
    ``v <= high``, ``v < below``), among ``choices``, and passing ``check``. ``text`` says what
    is allowed where the bounds do not say it all."""

    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    text: str = ""

    def allows(self, kind: str, value: Any) -> bool:
        if not of_kind(kind, value) or (self.choices and value not in self.choices):
            return False
        if kind in ("int", "float") and not self._within(value):
            return False
        return self.check is None or self.check(value)

    def _within(self, value: float) -> bool:
        return (
            (self.low is None or value >= self.low)
            and (self.above is None or value > self.above)
            and (self.high is None or value <= self.high)
            and (self.below is None or value < self.below)
        )

    def requirement(self, kind: str, typed: bool = False) -> str:
        """What a value must be: ``an integer in [1, 16]``, or ``in [1, 16]`` once its type is
        known to be right (``typed``)."""
        if self.text:
            return self.text
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if kind == "bool":
            return "True or False"
        bounds = self.bounds()
        if typed:
            return bounds
        return f"{_NOUNS.get(kind, kind)} {bounds}".strip()

    def bounds(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, or nothing."""
        lower = _bound(self.low, ">=", "[") or _bound(self.above, ">", "(")
        upper = _bound(self.high, "<=", "]") or _bound(self.below, "<", ")")
        if lower and upper:
            return f"in {lower[1]}{lower[2]}, {upper[2]}{upper[1]}"
        sign, _, number = lower or upper or ("", "", "")
        return f"{sign} {number}".strip()


@dataclass(frozen=True)
class Cli:
    """The command line's form of an option whose value has another type there: ``kind``
    (``float``, ``str``) with ``allowed`` values; ``to_engine`` turns it into the option's value,
    ``from_engine`` the option's default into the flag's."""

    kind: str
    allowed: Allowed
    to_engine: Callable[[Any], Any]
    from_engine: Callable[[Any], Any]


@dataclass(frozen=True)
class Option:
    """An option's definition besides its name, type and default (its field's metadata)."""

    help: str
    allowed: Allowed
    flag: str = ""  # the command line's name, where it is not the field's
    cli: Cli | None = None  # the command line's form, where the value has another type there


def option_of(f: Field) -> Option:
    """The definition of a ``GossipOptions`` (or ``gossipgrad train``) field."""
    return f.metadata["option"]


def of_kind(kind: str, value: Any) -> bool:
    """Whether ``value`` is of ``kind``: ``bool``; ``int`` (not a bool); ``float`` (an int or a
    float, finite, not a bool); ``str``. Any value is of another kind (its check decides)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) if kind == "int" else math.isfinite(value)
    return isinstance(value, str) if kind == "str" else True


def _bound(value: float | None, sign: str, bracket: str) -> tuple[str, str, str] | None:
    """A bound as (``>=``, ``[``, ``1``); None where there is none."""
    if value is None:
        return None
    number = str(value) if isinstance(value, int) else f"{value:g}"
    return sign, bracket, "2**63 - 1" if value == _INT64_MAX else number


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (``|`` in a cell escaped)."""
    lines = [header, tuple("---" for _ in header), *rows]
    cells = (" | ".join(c.replace("|", "\\|") for c in line) for line in lines)
    return "".join(f"| {line} |\n" for line in cells)
