"""Exceptions and warnings raised by qsengine.

Every bad input raises a :class:`ValueError` or :class:`TypeError` (or one of
the subclasses below) whose message names the argument or field, the value,
and the rule that was broken.
"""

from __future__ import annotations

from qsengine._core import ResourceLimitError

__all__ = ["SpecError", "ResourceLimitError", "QsengineWarning"]


class SpecError(ValueError):
    """A model, accelerator, cluster, plan or workload description is invalid.

    The message names the source (file or object), the field, the value and the
    rule. Raised by the spec constructors and loaders.
    """


class QsengineWarning(UserWarning):
    """A soft condition: the result is valid but worth a second look."""
