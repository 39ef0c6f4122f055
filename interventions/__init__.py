"""interventions: named sites of any PyTorch model, and causal interventions on them.

Public API (what applications may use): sites and the site graph, the primitives `get_value`,
`set_value` and `interchange`, intervention types, the patching sweep, and the errors.
"""

from .errors import (
    AlignmentError,
    CausalModelError,
    InterventionError,
    SelectorError,
    ShapeError,
    UnknownSiteError,
    UnsupportedModelError,
)
from .graph import SiteGraph
from .operators import (
    Add,
    Constant,
    Intervention,
    LowRankRotatedSubspace,
    Replace,
    Rotation,
    RotatedSubspace,
    Zero,
)
from .primitives import get_value, interchange, set_value
from .sites import Site

__all__ = [
    "Site", "SiteGraph",
    "get_value", "set_value", "interchange",
    "Intervention", "Replace", "Zero", "Constant", "Add", "Rotation", "RotatedSubspace",
    "LowRankRotatedSubspace",
    "InterventionError", "UnknownSiteError", "SelectorError", "ShapeError", "UnsupportedModelError",
    "AlignmentError", "CausalModelError",
]
