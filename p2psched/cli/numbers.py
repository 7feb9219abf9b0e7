"""Number options that refuse nan and inf.

click's FloatRange lets nan through every bound (each comparison with it is false)
and inf through any open-ended one; JSON has neither, and then a wait never ends or
a simulation divides by them. The error names the flag, as click's own do.
"""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A float option: finite, then within the range as FloatRange checks it."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            bounds = self._describe_range()
            self.fail(f"{value!r} is not a finite number" + (f"; give one {bounds}" if bounds else ""), param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()


#: A duration, a rate or a multiplier: any finite number above 0.
POSITIVE = FiniteFloat(min=0, min_open=True)
