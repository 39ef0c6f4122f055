"""`SiteGraph`: which named sites a model has, where they live, and in what order data flows through them.

Canonical names are the same for every supported architecture (see docs/concepts.md):
``layers.{i}.input``, ``layers.{i}.attention_heads``, ``layers.{i}.attention_output``,
``layers.{i}.mlp_output``, ``layers.{i}.output`` and ``logits``. Any module is also addressable by
raw path: ``module:<dotted.path>`` (its output) and ``module:<dotted.path>:input``.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

import networkx as nx
from torch import nn

from . import attention
from .errors import SelectorError, UnknownSiteError, UnsupportedModelError
from .families import Family, family_for
from .sites import Layout, Site

Kind = Literal["output", "input", "heads", "queries", "keys", "values", "pattern"]
HEAD_KINDS = ("heads", "queries", "keys", "values", "pattern")  # kinds whose value has a heads axis


@dataclass(frozen=True)
class SitePoint:
    """Where a site's value is read and written: a module, and which side of it."""

    module: nn.Module
    kind: Kind  # output of the module, its first input, or its first input viewed per head
    num_heads: int | None = None
    width: int | None = None  # size of the last axis where it is known in advance
    is_model_output: bool = False  # the root module's output (the `logits` site)
    tokens_of: nn.Module | None = None  # the value is [batch*seq, ...]: view it by this module's input shape
    route: object | None = None  # attention kinds: how the attention module is intercepted (attention.py)

    @property
    def layout(self) -> Layout:
        """Which axes the selectors index: the pattern is [batch, heads, q, k], all else [batch, seq, ...]."""
        return Layout.PATTERN if self.kind == "pattern" else Layout.TOKENS


def _get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _detect_layers(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The largest ModuleList whose children all share one class (an unknown model's blocks)."""
    best = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and any(True for _ in mod[0].parameters()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    return best


class SiteGraph:
    """The sites of one model as a networkx DiGraph in computation order.

    ``graph.sites`` lists canonical names in order, ``name in graph`` tests membership (module
    paths included), ``graph.num_layers`` counts blocks, ``graph.graph`` is the DiGraph.
    """

    _cache: "weakref.WeakKeyDictionary[nn.Module, SiteGraph]" = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module, family: Family | None, layers_path: str | None,
                 layers: nn.ModuleList | None):
        self.model = model
        self.family = family
        self.layers_path = layers_path
        self.num_layers = len(layers) if layers is not None else 0
        self._points: dict[str, SitePoint] = {}
        self._unsupported: dict[str, str] = {}  # site name -> why this model cannot have it
        self.graph = nx.DiGraph()
        self._module_paths = {name for name, _ in model.named_modules() if name}
        config = getattr(model, "config", None)
        self.num_heads = getattr(config, family.num_heads, None) if family and config is not None else None
        self.hidden_size = getattr(config, family.hidden_size, None) if family and config is not None else None
        if layers is not None:
            self._add_layers(layers, config)
        if self._has_head(model):
            self._add("logits", SitePoint(model, "output", is_model_output=True))
            if self.num_layers:
                self.graph.add_edge(f"layers.{self.num_layers - 1}.output", "logits")
        self.sites: list[str] = list(self._points)
        self._order = {name: i for i, name in enumerate(self.sites)}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "SiteGraph":
        """Build (or fetch the cached) site graph of `model`."""
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        cached = cls._cache.get(model)
        if cached is not None:
            return cached
        base = getattr(model, "base_model", model)
        base = base if isinstance(base, nn.Module) else model
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        config = getattr(model, "config", None)
        family = family_for(getattr(config, "model_type", None))
        layers_path, layers = None, None
        if family is not None:
            layers_path = ".".join(p for p in (prefix, family.layers) if p)
            layers = _get_module(model, layers_path)
        elif config is not None:  # an unknown Hugging Face model: guess its blocks
            found = _detect_layers(base)
            if found is not None:
                layers_path = ".".join(p for p in (prefix, found[0]) if p)
                layers = found[1]
                warnings.warn(
                    f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) has no "
                    f"family table; using the blocks found at '{layers_path}' for layers.{{i}}.input/output "
                    "only. Other places are reachable as 'module:<path>'.",
                    stacklevel=2,
                )
        graph = cls(model, family, layers_path, layers)
        cls._cache[model] = graph
        return graph

    @staticmethod
    def _has_head(model: nn.Module) -> bool:
        base = getattr(model, "base_model", None)
        return isinstance(base, nn.Module) and base is not model

    def _add(self, name: str, point: SitePoint) -> None:
        self._points[name] = point
        self.graph.add_node(name)

    def _add_layers(self, layers: nn.ModuleList, config) -> None:
        fam = self.family
        parallel = fam.parallel_residual if fam else False
        if isinstance(parallel, str):
            parallel = bool(getattr(config, parallel, False))
        head_dim = None
        if self.num_heads and self.hidden_size:
            head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        for i, block in enumerate(layers):
            p = f"layers.{i}"
            self._add(f"{p}.input", SitePoint(block, "input", width=self.hidden_size))
            self._add_attention_sites(p, block, config)
            if fam is not None:
                self._add(f"{p}.attention_heads", SitePoint(
                    block.get_submodule(fam.out_proj), "heads", num_heads=self.num_heads, width=head_dim))
                self._add(f"{p}.attention_output", SitePoint(
                    block.get_submodule(fam.attention), "output", width=self.hidden_size))
                self._add(f"{p}.mlp_output", SitePoint(
                    block.get_submodule(fam.mlp), "output", width=self.hidden_size,
                    tokens_of=block if fam.mlp_flattens else None))
            self._add(f"{p}.output", SitePoint(block, "output", width=self.hidden_size))
            g = self.graph
            if fam is not None:
                g.add_edge(f"{p}.input", f"{p}.attention_heads")
                g.add_edge(f"{p}.attention_heads", f"{p}.attention_output")
                g.add_edge(f"{p}.input", f"{p}.mlp_output")
                if not parallel:
                    g.add_edge(f"{p}.attention_output", f"{p}.mlp_output")
                g.add_edge(f"{p}.attention_output", f"{p}.output")
                g.add_edge(f"{p}.mlp_output", f"{p}.output")
            g.add_edge(f"{p}.input", f"{p}.output")
            if i > 0:
                g.add_edge(f"layers.{i - 1}.output", f"{p}.input")

    def _add_attention_sites(self, p: str, block: nn.Module, config) -> None:
        """queries, keys, values, attention_pattern of block `p` (see attention.py); or why not."""
        try:
            found = attention.sites_of(block, config)
        except UnsupportedModelError as e:
            self._unsupported.update({f"{p}.{suffix}": str(e) for suffix in attention.SITE_KINDS})
            return
        for suffix, a in found.items():
            self._add(f"{p}.{suffix}", SitePoint(a.module, a.kind, num_heads=a.num_heads, width=a.head_dim,
                                                 route=a.route))
        g = self.graph
        for suffix in ("queries", "keys", "values"):
            g.add_edge(f"{p}.input", f"{p}.{suffix}")
        g.add_edge(f"{p}.queries", f"{p}.attention_pattern")
        g.add_edge(f"{p}.keys", f"{p}.attention_pattern")
        after = f"{p}.attention_heads" if self.family is not None else f"{p}.output"
        g.add_edge(f"{p}.attention_pattern", after)
        g.add_edge(f"{p}.values", after)

    # -- queries ------------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        name = name.name if isinstance(name, Site) else name
        if name in self._points:
            return True
        return self._module_path(name) is not None

    def __len__(self) -> int:
        return len(self.sites)

    def __repr__(self) -> str:
        fam = self.family.name if self.family else "auto" if self.num_layers else "none"
        return f"SiteGraph({type(self.model).__name__}, family={fam}, layers={self.num_layers}, sites={len(self)})"

    @staticmethod
    def _module_path(name: str) -> tuple[str, Kind] | None:
        if not name.startswith("module:"):
            return None
        rest = name[len("module:"):]
        if rest.endswith(":input"):
            return rest[: -len(":input")], "input"
        return rest, "output"

    def order(self, name: str) -> int | None:
        """Position of a canonical site in computation order (None for module paths)."""
        return self._order.get(name)

    def precedes(self, a: str, b: str) -> bool:
        """True when data flows from site `a` to site `b` (a strictly before b)."""
        if a == b:
            return False
        return nx.has_path(self.graph, a, b) if a in self.graph and b in self.graph else False

    def point(self, name: str) -> SitePoint:
        """Where `name` lives; raises UnknownSiteError with the nearest valid names."""
        point = self._points.get(name)
        if point is not None:
            return point
        if name in self._unsupported:
            raise UnsupportedModelError(f"'{name}': {self._unsupported[name]}")
        parsed = self._module_path(name)
        if parsed is not None:
            path, kind = parsed
            if path == "" or path in self._module_paths:
                return SitePoint(_get_module(self.model, path), kind)
            near = difflib.get_close_matches(path, sorted(self._module_paths), n=5, cutoff=0.5)
            raise UnknownSiteError(
                f"{type(self.model).__name__} has no module '{path}'."
                + (f" Nearest module paths: {', '.join(near)}." if near else "")
                + " Module paths are those of model.named_modules()."
            )
        if not self.sites:
            raise UnknownSiteError(
                f"{type(self.model).__name__} is not a supported architecture, so it has no canonical site "
                f"'{name}'. Address its modules by path instead: 'module:<dotted.path>' for a module's output, "
                f"'module:<dotted.path>:input' for its input (paths as in model.named_modules(), e.g. "
                f"{', '.join(sorted(self._module_paths)[:3]) or 'none'})."
            )
        near = difflib.get_close_matches(name, self.sites, n=5, cutoff=0.5)
        raise UnknownSiteError(
            f"unknown site '{name}' for {type(self.model).__name__}."
            + (f" Nearest valid names: {', '.join(near)}." if near else "")
            + f" Valid names: layers.{{0..{self.num_layers - 1}}}.{{input,attention_heads,attention_output,"
            "mlp_output,output}"
            + (", logits" if "logits" in self._points else "")
            + "; or 'module:<path>'."
        )

    def check(self, site: Site) -> SitePoint:
        """Validate a site's name and its heads/dims selectors against the model (no inputs needed)."""
        point = self.point(site.name)
        if site.heads is not None:
            if point.kind not in HEAD_KINDS:
                raise SelectorError(
                    f"heads={list(site.heads)} given for '{site.name}', which has no heads; heads select "
                    "only on 'layers.{i}.attention_heads', queries, keys, values and attention_pattern sites."
                )
            bad = [h for h in site.heads if not 0 <= h < point.num_heads]
            if bad:
                what = "key/value heads" if point.kind in ("keys", "values") else "heads"
                raise SelectorError(
                    f"heads {bad} out of range for '{site.name}': the model has {point.num_heads} {what} "
                    f"there (valid 0..{point.num_heads - 1})."
                )
        if site.dims is not None and point.width is not None:
            check_dims(site, point.width)
        return point


def check_dims(site: Site, width: int) -> None:
    """Raise if `site.dims` does not fit a last axis of size `width`."""
    if isinstance(site.dims, slice):
        start, stop = site.dims.start or 0, site.dims.stop
        if start < 0 or (stop is not None and (stop > width or stop <= start)):
            raise SelectorError(
                f"dims {site.dims} out of range for '{site.name}', whose last axis has size {width} "
                f"(valid: a non-empty slice within 0..{width})."
            )
    else:
        bad = [d for d in site.dims if not -width <= d < width]
        if bad:
            raise SelectorError(
                f"dims {bad} out of range for '{site.name}', whose last axis has size {width} "
                f"(valid 0..{width - 1})."
            )
