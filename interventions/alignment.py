"""`Alignment`: a finite partial map from high-level keys to non-empty sets of low-level sites.

Keys are a causal model's variables or a smaller model's sites; images are sets of sites of the
larger (low-level) model. The algebra (composition ``b @ a``, ``restrict``, union ``|``, ``inverse``,
``identity``) lets alignments be built from pieces and chained across models; ``validate`` checks
one against the graphs of the models it maps. See docs/alignment.md for the laws.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import networkx as nx

from .errors import AlignmentError
from .sites import Site

class UnknownKeyError(AlignmentError, KeyError):
    """A key outside the alignment's domain (a KeyError too, so ``Mapping.get`` works)."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""


# -- helpers ------------------------------------------------------------------------------------
def _is_atom(value) -> bool:
    """One key/site rather than a collection of them: strings, Sites and non-iterable hashables."""
    return isinstance(value, (str, bytes, Site)) or not isinstance(value, Iterable)


def _check_hashable(value, what: str) -> None:
    try:
        hash(value)
    except TypeError as e:
        raise AlignmentError(
            f"{what} {value!r} is not hashable; keys and sites must be hashable atoms (a site name, a Site, "
            "or any hashable value)."
        ) from e


def _image(key, value) -> frozenset:
    """Coerce one value (an atom, or an iterable of atoms) to a non-empty frozenset of sites."""
    atoms = [value] if _is_atom(value) else list(value)
    for atom in atoms:
        _check_hashable(atom, f"site of key {key!r}:")
    image = frozenset(atoms)
    if not image:
        raise AlignmentError(
            f"key {key!r} maps to an empty set of sites; every key needs at least one site "
            "(leave the key out for an unaligned variable)."
        )
    return image


def _natural(atom) -> tuple:
    """Sort key that orders 'layers.10' after 'layers.9' and tolerates mixed atom types."""
    text = str(atom)
    return tuple((0, int(p), "") if p.isdecimal() else (1, 0, p) for p in re.split(r"(\d+)", text) if p) + (
        (2, 0, type(atom).__name__), (3, 0, repr(atom)))


def _sorted(atoms: Iterable) -> list:
    return sorted(atoms, key=_natural)


def _show(atoms: Iterable) -> str:
    return "{" + ", ".join(repr(a) for a in _sorted(atoms)) + "}"


def _name(atom):
    """The node an atom stands for in a graph: a Site's name, else the atom itself."""
    return atom.name if isinstance(atom, Site) else atom


def _as_digraph(graph, which: str) -> nx.DiGraph:
    inner = getattr(graph, "graph", None)  # a SiteGraph keeps its DiGraph in `.graph`
    if isinstance(inner, nx.DiGraph) and hasattr(graph, "precedes"):
        return inner
    if isinstance(graph, nx.DiGraph):
        return graph
    raise AlignmentError(
        f"{which} must be a SiteGraph or a networkx DiGraph, got {type(graph).__name__}"
    )


def _contains(graph, atom) -> bool:
    if isinstance(graph, nx.DiGraph):
        return _name(atom) in graph
    if not isinstance(atom, (str, Site)):  # SiteGraph names are strings
        return False
    return atom in graph


def _selection(value):
    """A selector as a set of ints or a half-open range ('range', start, stop|None); None = all."""
    if value is None:
        return None
    if isinstance(value, slice):
        return ("range", value.start or 0, value.stop)
    if hasattr(value, "flatten"):  # per-example positions: any value used by any example
        return frozenset(value.flatten().tolist())
    return frozenset(value)


def _meets(x, y) -> bool:
    if x is None or y is None:
        return True
    if isinstance(x, tuple) and isinstance(y, tuple):
        stops = [s for s in (x[2], y[2]) if s is not None]
        return max(x[1], y[1]) < (min(stops) if stops else float("inf"))
    if isinstance(x, tuple):
        x, y = y, x
    if isinstance(y, tuple):
        return any(y[1] <= v and (y[2] is None or v < y[2]) for v in x)
    return bool(x & y)


def _overlap(a, b) -> bool:
    """Whether two sites share a value (same name and intersecting selectors on every axis).

    Indices are compared as written (a negative dim is not resolved against the width).
    """
    if a == b:
        return True
    if not (isinstance(a, (str, Site)) and isinstance(b, (str, Site))):
        return False
    a, b = (x if isinstance(x, Site) else Site(x) for x in (a, b))
    if a.name != b.name:
        return False
    axes = ("positions", "heads", "dims")
    return all(_meets(_selection(getattr(a, f)), _selection(getattr(b, f))) for f in axes)


def _atom_to_json(atom, what: str):
    """A key or image atom as JSON: str / int as is, a tuple as {"tuple": [...]}, a Site as {"site": ...}."""
    from .serialization import site_to_json

    if isinstance(atom, Site):
        return {"site": site_to_json(atom)}
    if isinstance(atom, str) or (isinstance(atom, int) and not isinstance(atom, bool)):
        return atom
    if isinstance(atom, tuple):
        return {"tuple": [_atom_to_json(a, what) for a in atom]}
    raise AlignmentError(
        f"cannot write {what} {atom!r} ({type(atom).__name__}) as JSON: keys and sites must be str, int, "
        "tuples of those, or Sites."
    )


def _atom_from_json(data):
    from .serialization import site_from_json

    if isinstance(data, str) or (isinstance(data, int) and not isinstance(data, bool)):
        return data
    if isinstance(data, Mapping) and len(data) == 1:
        if "tuple" in data:
            return tuple(_atom_from_json(a) for a in data["tuple"])
        if "site" in data:
            return site_from_json(data["site"])
    raise ValueError(f"{data!r} is not a str, an int, {{'tuple': [...]}} or {{'site': {{...}}}}")


class _Reach:
    """Strict reachability in a DiGraph, with descendants computed once per node."""

    def __init__(self, graph: nx.DiGraph):
        self.graph = graph
        self._desc: dict = {}

    def precedes(self, a, b) -> bool:
        a, b = _name(a), _name(b)
        if a == b or a not in self.graph or b not in self.graph:
            return False
        if a not in self._desc:
            self._desc[a] = nx.descendants(self.graph, a)
        return b in self._desc[a]


# -- the alignment ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, init=False, repr=False)
class Alignment(Mapping):
    """A finite partial map ``key -> frozenset of sites``; immutable and hashable.

    Build it from a mapping whose values are one site or an iterable of sites:
    ``Alignment({"WX": "layers.0.output", "YZ": [Site("layers.1.output", dims=slice(0, 8))]})``.
    """

    _map: Mapping

    def __init__(self, mapping: Mapping | Iterable | None = None):
        if mapping is None:
            mapping = {}
        if isinstance(mapping, Alignment):
            object.__setattr__(self, "_map", mapping._map)
            return
        if not isinstance(mapping, Mapping):
            try:
                mapping = dict(mapping)
            except (TypeError, ValueError) as e:
                raise AlignmentError(
                    f"an Alignment is built from a mapping key -> site(s) (or an iterable of (key, sites) "
                    f"pairs), got {type(mapping).__name__}: {mapping!r}"
                ) from e
        built = {}
        for key, value in mapping.items():
            _check_hashable(key, "key")
            built[key] = _image(key, value)
        object.__setattr__(self, "_map", MappingProxyType(built))

    # -- mapping protocol ------------------------------------------------------------------------
    def __getitem__(self, key) -> frozenset:
        try:
            return self._map[key]
        except KeyError:
            raise UnknownKeyError(
                f"key {key!r} is not in the alignment's domain {_show(self._map)}"
            ) from None
        except TypeError as e:
            raise UnknownKeyError(f"key {key!r} is not hashable, so it is not in the alignment") from e

    def __contains__(self, key) -> bool:
        try:
            return key in self._map
        except TypeError:
            return False

    def __iter__(self):
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Alignment):
            return NotImplemented
        return dict(self._map) == dict(other._map)

    def __hash__(self) -> int:
        return hash(frozenset(self._map.items()))

    def __reduce__(self):  # picklable and copyable (a MappingProxyType is neither)
        return (Alignment, (dict(self._map),))

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {_show(self._map[k])}" for k in _sorted(self._map))
        return f"Alignment({{{items}}})"

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """This alignment as JSON text; `Alignment.from_json` gives back an equal alignment.

        Keys (and non-Site atoms of images) may be str, int or (nested) tuples of them; sites keep
        their selectors. Items are written in natural key order, so equal alignments give equal text.
        """
        items = [[_atom_to_json(k, "key"), [_atom_to_json(a, f"site of key {k!r}") for a in _sorted(v)]]
                 for k, v in ((k, self._map[k]) for k in _sorted(self._map))]
        return json.dumps({"format": "interventions.Alignment", "version": 1, "items": items})

    @classmethod
    def from_json(cls, text: str) -> Alignment:
        """The alignment `to_json` wrote; malformed text raises AlignmentError saying what is wrong."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise AlignmentError(f"Alignment.from_json: not valid JSON ({e})") from None
        if not isinstance(data, Mapping) or data.get("format") != "interventions.Alignment":
            raise AlignmentError("Alignment.from_json: not an alignment written by Alignment.to_json "
                                 "(expected an object with format 'interventions.Alignment')")
        if data.get("version") != 1:
            raise AlignmentError(
                f"Alignment.from_json: version {data.get('version')!r} is unsupported (reads 1)")
        try:
            return cls({_atom_from_json(k): [_atom_from_json(a) for a in v] for k, v in data["items"]})
        except (KeyError, TypeError, ValueError) as e:
            raise AlignmentError(f"Alignment.from_json: malformed items ({type(e).__name__}: {e})") from None

    # -- views -----------------------------------------------------------------------------------
    @property
    def domain(self) -> frozenset:
        """The keys the alignment is defined on."""
        return frozenset(self._map)

    @property
    def image(self) -> frozenset:
        """Every low-level site any key maps to (the union of all images)."""
        return frozenset().union(*self._map.values())

    def sites(self, keys: Iterable | Any = None) -> frozenset:
        """The union of the images of `keys` (all keys by default): what to intervene on for them."""
        if keys is None:
            return self.image
        return frozenset().union(*(self[k] for k in self._keys(keys)))

    def _keys(self, keys) -> list:
        keys = [keys] if _is_atom(keys) else list(keys)
        missing = [k for k in keys if k not in self]
        if missing:
            raise UnknownKeyError(
                f"keys {_show(missing)} are not in the alignment's domain {_show(self._map)}"
            )
        return keys

    # -- algebra ---------------------------------------------------------------------------------
    @staticmethod
    def _coerce(other, op: str) -> Alignment:
        if isinstance(other, Alignment):
            return other
        if isinstance(other, Mapping):
            return Alignment(other)
        raise AlignmentError(f"'{op}' combines two Alignments (or an Alignment and a mapping), got "
                             f"{type(other).__name__}")

    def __matmul__(self, inner) -> Alignment:
        """``b @ a``: apply `a`, then map each of its sites through `b` (function-composition order)."""
        inner = self._coerce(inner, "@")
        missing = inner.image - self.domain
        if missing:
            raise AlignmentError(
                f"cannot compose b @ a: sites {_show(missing)} of a's image are not in b's domain "
                f"{_show(self._map)}; every site a maps to must be a key of b."
            )
        outer = self._map
        return Alignment({k: frozenset().union(*(outer[s] for s in v)) for k, v in inner._map.items()})

    def __rmatmul__(self, outer) -> Alignment:
        return self._coerce(outer, "@") @ self

    def restrict(self, keys) -> Alignment:
        """The alignment on `keys` only (one key or an iterable; each must be in the domain)."""
        return Alignment({k: self._map[k] for k in self._keys(keys)})

    def __or__(self, other) -> Alignment:
        """Union of two alignments with disjoint domains and disjoint images."""
        other = self._coerce(other, "|")
        shared = self.domain & other.domain
        if shared:
            raise AlignmentError(f"cannot unite alignments: both define keys {_show(shared)} "
                                 "(domains must be disjoint)")
        overlap = self.image & other.image
        if overlap:
            raise AlignmentError(f"cannot unite alignments: both map to sites {_show(overlap)} "
                                 "(images must be disjoint)")
        return Alignment({**self._map, **other._map})

    def __ror__(self, other) -> Alignment:
        return self._coerce(other, "|") | self

    def inverse(self) -> Alignment:
        """``site -> {key}``; needs every image to be one site and distinct keys to map to distinct sites."""
        wide = {k: v for k, v in self._map.items() if len(v) != 1}
        if wide:
            shown = ", ".join(f"{k!r} -> {_show(wide[k])}" for k in _sorted(wide))
            raise AlignmentError(
                f"cannot invert: keys map to several sites ({shown}); an inverse needs every image to be "
                "exactly one site."
            )
        inverse: dict = {}
        for key, (site,) in self._map.items():
            inverse.setdefault(site, []).append(key)
        shared = {s: ks for s, ks in inverse.items() if len(ks) > 1}
        if shared:
            shown = ", ".join(f"{s!r} <- {_show(ks)}" for s, ks in shared.items())
            raise AlignmentError(f"cannot invert: distinct keys map to the same site ({shown}); an inverse "
                                 "needs images to be distinct.")
        return Alignment({s: ks[0] for s, ks in inverse.items()})

    @classmethod
    def identity(cls, keys: Iterable) -> Alignment:
        """``k -> {k}`` for each key: the unit of composition on that set."""
        keys = [keys] if _is_atom(keys) else list(keys)
        return cls({k: [k] for k in keys})

    # -- validation ------------------------------------------------------------------------------
    def validate(self, high_graph=None, low_graph=None) -> Alignment:
        """Check the alignment against the models it maps; return self, or raise AlignmentError.

        Always: images of distinct keys are disjoint. With `high_graph`: every key is one of its nodes.
        With `low_graph` (a SiteGraph; a DiGraph also works): every site exists there. With both:
        order is kept, i.e. if key A precedes key B, no site of Π(B) strictly precedes all of Π(A).
        `high_graph` is a SiteGraph (a smaller model) or a networkx DiGraph (a causal model).
        """
        self._check_disjoint()
        high = _as_digraph(high_graph, "high_graph") if high_graph is not None else None
        if low_graph is not None:
            _as_digraph(low_graph, "low_graph")
            missing = [s for s in self.image if not _contains(low_graph, s)]
            if missing:
                raise AlignmentError(
                    f"sites {_show(missing)} do not exist in the low-level model ({low_graph!r})"
                )
        if high is not None:
            missing = [k for k in self._map if not _contains(high_graph, k)]
            if missing:
                raise AlignmentError(f"keys {_show(missing)} are not variables of the high-level model "
                                     f"({_describe(high_graph)})")
        if high is not None and low_graph is not None:
            self._check_order(_Reach(high), _Reach(_as_digraph(low_graph, "low_graph")))
        return self

    def _check_disjoint(self) -> None:
        by_name: dict = {}  # a site's name -> [(key, site)], so only same-named sites are compared
        for key in _sorted(self._map):
            for site in _sorted(self._map[key]):
                by_name.setdefault(_name(site), []).append((key, site))
        for pairs in by_name.values():
            for i, (k1, s1) in enumerate(pairs):
                for k2, s2 in pairs[i + 1:]:
                    if k1 != k2 and _overlap(s1, s2):
                        raise AlignmentError(
                            f"keys {k1!r} and {k2!r} both map to {s1!r}" + ("" if s1 == s2 else f" / {s2!r}")
                            + "; images of distinct keys must be disjoint (sites of the same name must "
                            "select disjoint positions, heads or dims)."
                        )

    def _check_order(self, high: _Reach, low: _Reach) -> None:
        keys = _sorted(self._map)
        for a in keys:
            for b in keys:
                if not high.precedes(a, b):
                    continue
                for site in _sorted(self._map[b]):
                    if all(low.precedes(site, s) for s in self._map[a]):
                        raise AlignmentError(
                            f"order not kept: {a!r} precedes {b!r} in the high-level model, but site "
                            f"{site!r} of {b!r} comes before every site of {a!r} {_show(self._map[a])} in "
                            "the low-level model."
                        )


def _describe(graph) -> str:
    if isinstance(graph, nx.DiGraph):
        nodes = _sorted(graph.nodes)
        shown = ", ".join(repr(n) for n in nodes[:8]) + (", ..." if len(nodes) > 8 else "")
        return f"nodes: {shown}"
    return repr(graph)


def interchange_aligned(model, base, source, alignment: Alignment, keys=None, **kwargs):
    """Interchange the sites `alignment` gives `keys` (default: all) from `source` into `base`.

    No sites at all (an empty alignment or no keys) is a plain forward on `base`. Extra keyword
    arguments go to `interchange` (e.g. ``in_batch=True``, ``intervention=...``).
    """
    from .hooks import call
    from .primitives import interchange

    if not isinstance(alignment, Alignment):
        alignment = Alignment(alignment)
    sites = alignment.sites(keys)
    if not sites:
        return call(model, base)
    return interchange(model, base, source, _sorted(sites), **kwargs)
