"""Errors of the distillation application: each says what was wrong and what is valid."""

from __future__ import annotations

from interventions import InterventionError


class DistillConfigError(InterventionError):
    """An option, recipe or objective that cannot be used as given."""


class IncompatibleModelsError(InterventionError):
    """Teacher and student cannot be distilled together (vocabulary, hidden size, family)."""


class DataError(InterventionError):
    """Training or evaluation data that is missing, empty, unreadable or too short."""


class SpanError(DataError):
    """A sequence too short to hold an interchange span."""


class NonFiniteLossError(InterventionError):
    """A NaN or infinite loss: training stops, the last good checkpoint is kept."""
