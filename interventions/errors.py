"""One exception family for every bad input; each message says what was wrong and what is valid."""

from __future__ import annotations


class InterventionError(ValueError):
    """Base class of every error this library raises on bad input."""


class UnknownSiteError(InterventionError, KeyError):
    """A site name the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class SelectorError(InterventionError):
    """Positions, heads or dims that do not fit the site or the inputs."""


class ShapeError(InterventionError):
    """A value whose shape does not match the site it is written to."""


class UnsupportedModelError(InterventionError):
    """A model whose blocks cannot be found; module paths still work."""


class AlignmentError(InterventionError):
    """An alignment that is malformed or does not fit the models it maps."""


class CausalModelError(InterventionError):
    """A causal model that is malformed, or a query it cannot answer."""
