"""interventions: named sites of any PyTorch model, and causal interventions on them.

Public API (what applications may use): sites and the site graph, the primitives `get_value`,
`set_value` and `interchange`, intervention types, the patching sweep, and the errors.
"""

from . import alignments
from .alignment import Alignment, interchange_aligned
from .cache import BlockRecording, record_blocks, replay_blocks
from .causal_model import CausalModel, CounterfactualDataset
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
from .patching import patching_sweep
from .metrics import IIAResult, RotatedDims, iia, iit_loss, interchange_output, logits_of
from .primitives import get_value, interchange, set_value
from .training import das_loss, frozen, mixed_batches, task_loss
from .sites import Site

__all__ = [
    "Site", "SiteGraph",
    "get_value", "set_value", "interchange", "patching_sweep",
    "Intervention", "Replace", "Zero", "Constant", "Add", "Rotation", "RotatedSubspace",
    "LowRankRotatedSubspace",
    "InterventionError", "UnknownSiteError", "SelectorError", "ShapeError", "UnsupportedModelError",
    "AlignmentError", "CausalModelError",
    "Alignment", "alignments", "interchange_aligned",
    "BlockRecording", "record_blocks", "replay_blocks",
    "CausalModel", "CounterfactualDataset", "IIAResult", "RotatedDims", "iia", "iit_loss", "interchange_output",
    "logits_of",
    "das_loss", "frozen", "mixed_batches", "task_loss",
]
