"""Exceptions. Every error fewstep raises on bad input is a :class:`FewstepError` (a ``ValueError``)
whose message names the offending value."""

from __future__ import annotations


class FewstepError(ValueError):
    """Base class of fewstep's input errors."""


class ArgumentError(FewstepError):
    """An argument has a wrong type or value, or an option is unknown (the message lists the valid ones)."""


class ScheduleError(FewstepError):
    """A noise schedule or time grid is malformed (unknown name, out of range, not monotone)."""


class ModelOutputError(FewstepError):
    """A model returned a wrong shape, dtype, or non-finite values."""


class ShapeError(FewstepError):
    """An input tensor has the wrong shape."""


class SolverError(FewstepError):
    """A solver strategy cannot run as asked (order too high for its history, NFE too small, ...)."""


class ScheduleFileError(FewstepError):
    """A solver-schedule JSON file is malformed."""


class ZooError(FewstepError):
    """A bundled model is unknown, or its weight file or card is missing or corrupted."""
