"""Argument types LightningCLI checks while parsing; plain ``int``/``float`` everywhere else.

A bad value given on the command line or in a YAML file (``every_n_steps=0``) should stop
``LightningCLI`` with one line, ``error: Parser key "...every_n_steps": ...``, before anything is
built. jsonargparse checks a value against its annotation at parse time, but calls
``__init__`` (whose ``MisconfigurationException`` it wraps in a long chained traceback) only
later, when it instantiates the classes. So the callbacks annotate their numeric arguments
with jsonargparse's restricted number types when jsonargparse is importable (it is an
optional extra, ``lightning-stability[cli]``; ``LightningCLI`` cannot run without it).
Without it these names are ``int``/``float`` and nothing changes. Type checkers always see
``int``/``float``, so ``StabilityMonitor(every_n_steps=50)`` type-checks as before, and
``__init__`` still validates every value itself (Python callers get the
``MisconfigurationException``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["AtLeastTwoInt", "NonNegativeFloat", "NonNegativeInt", "PositiveInt"]

if TYPE_CHECKING:
    PositiveInt = int
    NonNegativeInt = int
    AtLeastTwoInt = int
    NonNegativeFloat = float
else:
    try:
        from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt, restricted_number_type
    except ImportError:  # no LightningCLI in this environment: plain types
        PositiveInt = NonNegativeInt = AtLeastTwoInt = int
        NonNegativeFloat = float
    else:
        AtLeastTwoInt = restricted_number_type("AtLeastTwoInt", int, (">=", 2))
