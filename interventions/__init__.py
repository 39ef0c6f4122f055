"""interventions: named sites of any PyTorch model, and causal interventions on them.

This module is the public API — everything applications may use:

- sites and the site graph: `Site`, `SiteGraph`;
- the primitives: `get_value`, `set_value`, `interchange`; the sweep `patching_sweep`;
- intervention types: `Replace`, `Zero`, `Constant`, `Add`, `Rotation`, `RotatedSubspace`, ...;
- reuse of a forward pass: `record_blocks`, `replay_blocks`;
- alignments: `Alignment`, `interchange_aligned`, and the layer-stride constructors in `alignments`;
- causal models and metrics: `CausalModel`, `CounterfactualDataset`, `iia`, `iit_loss`, `das_loss`, ...;
- errors: `InterventionError` and its subclasses.
"""

from . import layer_alignments as alignments  # the public name: iv.alignments.full(...)
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
from .metrics import IIAResult, RotatedDims, iia, iit_loss, interchange_output, logits_of
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
from .primitives import get_value, interchange, set_value
from .sites import Site
from .training import das_loss, frozen, mixed_batches, task_loss

__all__ = [
    # sites and the graph
    "Site", "SiteGraph",
    # primitives
    "get_value", "set_value", "interchange", "patching_sweep",
    # intervention types
    "Intervention", "Replace", "Zero", "Constant", "Add", "Rotation", "RotatedSubspace",
    "LowRankRotatedSubspace",
    # reuse of a forward pass
    "BlockRecording", "record_blocks", "replay_blocks",
    # alignments
    "Alignment", "alignments", "interchange_aligned",
    # causal models, metrics, training helpers
    "CausalModel", "CounterfactualDataset", "IIAResult", "RotatedDims", "iia", "iit_loss", "interchange_output",
    "logits_of", "das_loss", "frozen", "mixed_batches", "task_loss",
    # errors
    "InterventionError", "UnknownSiteError", "SelectorError", "ShapeError", "UnsupportedModelError",
    "AlignmentError", "CausalModelError",
]

# researcher workflows: gradients at sites, attribution patching, saving interventions (issue 13)
from .attribution import attribution_patching
from .gradients import ValueAndGrad, value_and_grad

__all__ += ["ValueAndGrad", "value_and_grad", "attribution_patching"]
from .registry import Saveable
from .serialization import load_interventions, save_interventions

__all__ += ["Saveable", "save_interventions", "load_interventions"]
