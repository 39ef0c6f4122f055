"""`SiteGraph`: which named sites a model has, where they live, and in what order data flows through them.

Canonical names are the same for every supported architecture (see docs/sites.md):
``layers.{i}.input``, ``layers.{i}.attention_heads``, ``layers.{i}.attention_output``,
``layers.{i}.residual_mid``, ``layers.{i}.mlp_hidden``, ``layers.{i}.mlp_output``, ``layers.{i}.output``,
``final_norm`` and ``logits``. Any module is also addressable by raw path: ``module:<dotted.path>``
(its output) and ``module:<dotted.path>:input``. Where each site lives in a block is its
`LayerLayout`: the family table's entries, the rest inferred from the block's structure.
The graph follows the model: `from_model` rebuilds it when a module it uses was replaced or removed.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import torch
from torch import nn

from . import attention
from .errors import SelectorError, UnknownSiteError, UnsupportedModelError
from .families import INFERRED, Family, LayerLayout, family_for, resolve
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
    scale: float | None = None  # the site is the module's output times `scale` (Granite's residual multiplier)
    carry_to: nn.Module | None = None  # a write also shifts this module's output by the same delta
    copy: bool = False  # the model updates the value in place after the hook: hand it on as a copy
    route: attention.Route | None = None  # attention kinds: how the attention module is intercepted

    @property
    def layout(self) -> Layout:
        """Which axes the selectors index: the pattern is [batch, heads, q, k], all else [batch, seq, ...]."""
        return Layout.PATTERN if self.kind == "pattern" else Layout.TOKENS


def _no_graph() -> None:
    return None


def _get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _detect_layers(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of same-class children holding the most parameters (an unknown model's blocks).

    By parameters, not length: a block may hold a longer list itself (StableLM's per-head q/k norms).
    """
    best, best_size = None, 0
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    return best


class SiteGraph:
    """The sites of one model as a networkx DiGraph in computation order.

    ``graph.sites`` lists canonical names in order, ``name in graph`` tests membership (module
    paths included), ``graph.num_layers`` counts blocks, ``graph.graph`` is the DiGraph.
    """

    #: Where a model keeps its graph: on the model itself, so that the graph (which references the
    #: model) dies with it. A process-wide cache keyed by the model would keep every model alive.
    _ATTRIBUTE = "_interventions_site_graph"

    def __init__(self, model: nn.Module, family: Family | None, layers_path: str | None,
                 layers: nn.ModuleList | None, layouts: list[LayerLayout] | None = None):
        self.model = model
        self.family = family
        self.layers_path = layers_path
        self.num_layers = len(layers) if layers is not None else 0
        self.layouts: list[LayerLayout] = list(layouts or [])  # per block; empty: block sites only
        self._points: dict[str, SitePoint] = {}
        self._missing: dict[str, str] = {}  # canonical sites this model lacks -> why
        self._unsupported: dict[str, str] = {}  # attention sites this model cannot have -> why
        self._anchors: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, child) used
        self.graph = nx.DiGraph()
        self._module_paths = {name for name, _ in model.named_modules() if name}
        config = getattr(model, "config", None)
        names = family or Family("", (), "", "", "", "")
        self.num_heads = getattr(config, names.num_heads, None) if self.layouts and config is not None else None
        self.hidden_size = getattr(config, names.hidden_size, None) if self.layouts and config is not None else None
        if layers is not None:
            self._anchor(model, layers_path)
            self._add_layers(layers, config)
        self._add_final_norm(model)
        if self._has_head(model):
            self._add("logits", SitePoint(model, "output", is_model_output=True))
            last = "final_norm" if "final_norm" in self._points else f"layers.{self.num_layers - 1}.output"
            if self.num_layers or "final_norm" in self._points:
                self.graph.add_edge(last, "logits")
        self.sites: list[str] = list(self._points)
        self._order = {name: i for i, name in enumerate(self.sites)}

    def __reduce__(self):
        """A copied or pickled model does not carry its graph (its modules are new): rebuilt on first use."""
        return (_no_graph, ())

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "SiteGraph":
        """Build (or fetch the cached) site graph of `model`."""
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        cached = model.__dict__.get(cls._ATTRIBUTE)
        if cached is not None and cached.is_current():
            return cached
        base = getattr(model, "base_model", model)
        base = base if isinstance(base, nn.Module) else model
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        family = family_for(model_type)
        layers_path, layers, layouts = None, None, None
        if family is not None:
            layers_path = ".".join(p for p in (prefix, family.layers) if p)
            layers = _get_module(model, layers_path)
            layouts = [resolve(family, block, config) for block in layers]
        elif config is not None:  # no table: find the blocks, then infer their parts
            found = _detect_layers(base)
            if found is not None:
                layers_path = ".".join(p for p in (prefix, found[0]) if p)
                layers = found[1]
                try:
                    layouts = [resolve(None, block, config) for block in layers]
                except UnsupportedModelError as err:
                    warnings.warn(
                        f"{type(model).__name__} (model_type={model_type!r}) has no family table and its blocks "
                        f"at '{layers_path}' have no recognisable sublayers ({err}); using them for "
                        "layers.{i}.input/output only. Other places are reachable as 'module:<path>'.",
                        stacklevel=2,
                    )
                else:
                    if model_type not in INFERRED:
                        warnings.warn(
                            f"{type(model).__name__} (model_type={model_type!r}) has no family table; its sites "
                            f"were inferred from the structure of the blocks at '{layers_path}' and are not "
                            "verified for this model type (see SiteGraph.describe()).",
                            stacklevel=2,
                        )
        graph = cls(model, family, layers_path, layers, layouts)
        object.__setattr__(model, cls._ATTRIBUTE, graph)  # a plain attribute: not a submodule, not in state_dict
        return graph

    # -- following the model --------------------------------------------------------------------
    def _anchor(self, root: nn.Module, path: str) -> nn.Module:
        """Record every (parent, name, child) step from `root` down `path`; returns the module there."""
        module = root
        for part in path.split(".") if path else ():
            child = module._modules[part]
            self._anchors.append((module, part, child))
            module = child
        return module

    def is_current(self) -> bool:
        """False once a module any site uses was replaced, removed, or the block list changed length."""
        if any(parent._modules.get(name) is not child for parent, name, child in self._anchors):
            return False
        if self.layers_path is not None and len(_get_module(self.model, self.layers_path)) != self.num_layers:
            return False
        head = self._output_embedding(self.model)
        return (head is None) == ("final_norm" not in self._points) and (
            head is None or head is self._points["final_norm"].module)

    def describe(self) -> str:
        """Which table or inference decided each part, layer by layer (identical layers are grouped)."""
        lines = [repr(self)]
        groups: list[tuple[list[int], LayerLayout]] = []
        for i, layout in enumerate(self.layouts):
            if groups and groups[-1][1] == layout and groups[-1][1].sources == layout.sources:
                groups[-1][0].append(i)
            else:
                groups.append(([i], layout))
        for idx, layout in groups:
            span = f"layers {idx[0]}..{idx[-1]}" if len(idx) > 1 else f"layer {idx[0]}"
            lines.append(f"{span} ({'parallel' if layout.parallel else 'sequential'} residual):")
            parts = [("attention", layout.attention), ("out_proj", layout.out_proj),
                     ("attention_output", layout.attention_output), ("residual_mid", layout.residual_mid),
                     ("mlp_out_proj", layout.mlp_out_proj), ("mlp_output", layout.mlp_output)]
            for part, path in parts:
                where = f"{self.layers_path}.{{i}}.{path}" if path else "none"
                lines.append(f"  {part:17s} {where:55s} [{layout.sources.get(part, 'inferred')}]")
            if layout.residual_scale is not None:
                lines.append(f"  residual_scale    {layout.residual_scale:<55g} [{layout.sources.get('residual_scale')}]")
        if not self.layouts and self.num_layers:
            lines.append(f"blocks at '{self.layers_path}' (detected): layers.{{i}}.input/output only")
        if "final_norm" in self._points:
            lines.append(f"final_norm: input of {type(self._points['final_norm'].module).__name__} "
                         "(get_output_embeddings())")
        return "\n".join(lines)

    @staticmethod
    def _has_head(model: nn.Module) -> bool:
        base = getattr(model, "base_model", None)
        return isinstance(base, nn.Module) and base is not model

    def _add(self, name: str, point: SitePoint) -> None:
        self._points[name] = point
        self.graph.add_node(name)

    @staticmethod
    def _output_embedding(model: nn.Module) -> nn.Module | None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, nn.Module) else None

    def _add_final_norm(self, model: nn.Module) -> None:
        """`final_norm`: the input of the output embedding (the final norm's output)."""
        head = self._output_embedding(model)
        if head is None:
            return
        path = next((n for n, m in model.named_modules() if m is head), None)
        if path is None:
            return
        self._anchor(model, path)
        width = getattr(head, "in_features", None)
        self._add("final_norm", SitePoint(head, "input", width=width))
        if self.num_layers:
            self.graph.add_edge(f"layers.{self.num_layers - 1}.output", "final_norm")

    def attention_module(self, layer: int) -> nn.Module:
        """The module of block `layer` that owns the attention's q/k/v and output projections."""
        return self._block(layer).get_submodule(self.layouts[layer].attention)

    def _block(self, layer: int) -> nn.Module:
        return _get_module(self.model, self.layers_path)[layer]

    def _add_layers(self, layers: nn.ModuleList, config) -> None:
        for i, block in enumerate(layers):
            self._anchors.append((layers, str(i), block))
            self._add_layer(i, block, self.layouts[i] if self.layouts else None)
            if i > 0:
                self.graph.add_edge(f"layers.{i - 1}.output", f"layers.{i}.input")

    def _add_layer(self, i: int, block: nn.Module, layout: LayerLayout | None) -> None:
        """Every site of block `i`, in computation order, with the edges data flows along."""
        p, g = f"layers.{i}", self.graph
        hidden = self.hidden_size
        self._add(f"{p}.input", SitePoint(block, "input", width=hidden))
        self._add_attention_sites(p, block, layout is not None)
        if layout is None:
            self._add(f"{p}.output", SitePoint(block, "output", width=hidden))
            g.add_edge(f"{p}.input", f"{p}.output")
            return

        def at(path: str) -> nn.Module:
            return self._anchor(block, path)

        tokens_of = block if layout.flattens else None
        heads = self.num_heads
        head_dim = None
        if heads and hidden:
            head_dim = getattr(self.model.config, "head_dim", None) or hidden // heads
        self._add(f"{p}.attention_heads", SitePoint(at(layout.out_proj), "heads", num_heads=heads, width=head_dim))
        self._add(f"{p}.attention_output", SitePoint(
            at(layout.attention_output), "output", width=hidden, scale=layout.residual_scale))
        at(layout.attention)
        if layout.residual_mid is not None:
            self._add(f"{p}.residual_mid", SitePoint(
                at(layout.residual_mid), "input", width=hidden, tokens_of=tokens_of, carry_to=block))
        else:
            self._missing[f"{p}.residual_mid"] = layout.why_no_mid
        if layout.mlp_out_proj is not None:
            proj = at(layout.mlp_out_proj)
            width = getattr(proj, "in_features", None) or (proj.weight.shape[0] if hasattr(proj, "nf") else None)
            self._add(f"{p}.mlp_hidden", SitePoint(proj, "input", width=width, tokens_of=tokens_of))
        else:
            self._missing[f"{p}.mlp_hidden"] = layout.why_no_neurons
        self._add(f"{p}.mlp_output", SitePoint(
            at(layout.mlp_output), "output", width=hidden, tokens_of=tokens_of, scale=layout.residual_scale,
            copy=layout.copy_mlp_output))
        self._add(f"{p}.output", SitePoint(block, "output", width=hidden))
        mid = f"{p}.residual_mid" if layout.residual_mid is not None else None
        mlp_in = mid or (f"{p}.attention_output" if not layout.parallel else f"{p}.input")
        neurons = f"{p}.mlp_hidden" if layout.mlp_out_proj is not None else None
        g.add_edge(f"{p}.input", f"{p}.attention_heads")
        g.add_edge(f"{p}.attention_heads", f"{p}.attention_output")
        if mid:
            g.add_edge(f"{p}.attention_output", mid)
            g.add_edge(f"{p}.input", mid)
        g.add_edge(f"{p}.input", neurons or f"{p}.mlp_output")
        if mlp_in != f"{p}.input":
            g.add_edge(mlp_in, neurons or f"{p}.mlp_output")
        if neurons:
            g.add_edge(neurons, f"{p}.mlp_output")
        g.add_edge(f"{p}.attention_output", f"{p}.output")
        g.add_edge(f"{p}.mlp_output", f"{p}.output")
        g.add_edge(f"{p}.input", f"{p}.output")

    def _add_attention_sites(self, p: str, block: nn.Module, has_heads: bool) -> None:
        """queries, keys, values, attention_pattern of block `p` (found by attention.py); or why not."""
        try:
            found = attention.sites_of(block, getattr(self.model, "config", None))
        except UnsupportedModelError as e:
            self._unsupported.update({f"{p}.{suffix}": str(e) for suffix in attention.SITE_KINDS})
            return
        module = next(iter(found.values())).module
        self._anchor(block, next(n for n, m in block.named_modules() if m is module))
        for suffix, a in found.items():
            self._add(f"{p}.{suffix}", SitePoint(a.module, a.kind, num_heads=a.num_heads, width=a.head_dim,
                                                 route=a.route))
        g = self.graph
        after = f"{p}.attention_heads" if has_heads else f"{p}.output"
        for suffix in ("queries", "keys", "values"):
            g.add_edge(f"{p}.input", f"{p}.{suffix}")
        g.add_edge(f"{p}.queries", f"{p}.attention_pattern")
        g.add_edge(f"{p}.keys", f"{p}.attention_pattern")
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

    def layer_indices(self, layers, allow_empty: bool = False) -> list[int]:
        """Validated block indices in the caller's order: None (all), an int, or a list of ints (or a
        tensor); negatives count from the end. Raises SelectorError naming the valid range."""
        n = self.num_layers
        if layers is None:
            return list(range(n))
        if isinstance(layers, torch.Tensor):
            layers = layers.flatten().tolist()
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)) and not layers and allow_empty:
            return []
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise SelectorError(f"layers must be None (all) or a non-empty list of layer indices, got {layers!r}")
        bad_type = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
        if bad_type:
            raise SelectorError(f"layers must be ints (0..{n - 1}, or negative from the end), got {bad_type[0]!r}")
        bad = [x for x in layers if not -n <= x < n]
        if bad:
            raise SelectorError(f"layers {bad} out of range: the model has {n} blocks (valid 0..{n - 1}, or "
                                "negative from the end)")
        out = [x % n for x in layers]
        if len(set(out)) != len(out):
            raise SelectorError(f"layers must not repeat, got {list(layers)}")
        return out

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
        if name in self._missing:
            layer = name.split(".")[1]
            have = [s.split(".", 2)[2] for s in self.sites if s.startswith(f"layers.{layer}.")]
            raise UnknownSiteError(
                f"{type(self.model).__name__} has no site '{name}': {self._missing[name]}. "
                f"Sites of layer {layer}: {', '.join(have)}."
            )
        near = difflib.get_close_matches(name, self.sites, n=5, cutoff=0.5)
        kinds = list(dict.fromkeys(s.split(".", 2)[2] for s in self.sites if s.startswith("layers.")))
        model_level = [s for s in self.sites if not s.startswith("layers.")]
        raise UnknownSiteError(
            f"unknown site '{name}' for {type(self.model).__name__}."
            + (f" Nearest valid names: {', '.join(near)}." if near else "")
            + f" Valid names: layers.{{0..{self.num_layers - 1}}}.{{{','.join(kinds)}}}"
            + "".join(f", {m}" for m in model_level)
            + "; or 'module:<path>' (see docs/sites.md)."
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
