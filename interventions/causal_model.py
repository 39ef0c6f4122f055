"""`CausalModel`: the high-level side of causal abstraction (variables, parents, mechanisms on a DAG).

Batching: every value is a *batch*. Input values are tensors with a leading batch axis, and each
mechanism is vectorised: it receives its parents' batched values (in the declared parent order)
and returns the variable's batched value. One call of `run` therefore evaluates a whole dataset,
with one Python call per variable, and counterfactual datasets are plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch

from .errors import CausalModelError
from .hooks import Inputs

Values = dict[str, Any]
Sampler = Callable[[int, torch.Generator], Mapping[str, torch.Tensor]]


def _concat_encode(input_names: Sequence[str]) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    def encode(values):
        parts = [torch.as_tensor(values[name]) for name in input_names]
        return torch.cat([p.reshape(p.shape[0], -1).float() for p in parts], dim=-1)
    return encode


class CausalModel:
    """A deterministic causal model: ``run(inputs, interventions)`` gives every variable's value.

    variables: names, in any order; those without parents are the *inputs* (given, not computed).
    parents: ``{variable: [parent, ...]}`` (omitted or empty for inputs).
    mechanisms: ``{variable: f(*parent_values) -> value}`` for every non-input variable, vectorised
    over the batch axis. output: the variable whose value is the label (default: the only sink).
    encode: maps a dict of input values to the network's input (default: the inputs flattened and
    concatenated along the last axis, in `variables` order). sampler: ``f(n, generator) -> inputs``.
    """

    def __init__(self, variables: Sequence[str], parents: Mapping[str, Sequence[str]],
                 mechanisms: Mapping[str, Callable], *, output: str | None = None,
                 encode: Callable[[Mapping[str, torch.Tensor]], Inputs] | None = None,
                 sampler: Sampler | None = None):
        if isinstance(variables, str) or not isinstance(variables, Sequence) or not variables:
            raise CausalModelError(f"variables must be a non-empty list of names, got {variables!r}")
        names = list(variables)
        if len(set(names)) != len(names) or not all(isinstance(v, str) and v for v in names):
            raise CausalModelError(f"variables must be distinct non-empty strings, got {names}")
        known = set(names)
        for child, ps in parents.items():
            if child not in known:
                raise CausalModelError(f"parents given for unknown variable {child!r}; variables are {names}")
            if isinstance(ps, str):
                raise CausalModelError(f"parents of {child!r} must be a list of names, got the string {ps!r}")
            bad = [p for p in ps if p not in known]
            if bad:
                raise CausalModelError(f"{child!r} has unknown parents {bad}; variables are {names}")
        graph = nx.DiGraph()
        graph.add_nodes_from(names)
        graph.add_edges_from((p, c) for c, ps in parents.items() for p in ps)
        if not nx.is_directed_acyclic_graph(graph):
            cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
            raise CausalModelError(f"the causal graph has a cycle ({cycle} -> ...); it must be a DAG")
        unknown = [v for v in mechanisms if v not in known]
        if unknown:
            raise CausalModelError(f"mechanisms given for unknown variables {unknown}; variables are {names}")
        inputs = [v for v in names if graph.in_degree(v) == 0]
        with_mech = [v for v in inputs if v in mechanisms]
        if with_mech:
            raise CausalModelError(
                f"mechanisms given for input variables {with_mech} (no parents): inputs are given to run(), "
                "not computed; give them parents or drop their mechanisms"
            )
        missing = [v for v in names if v not in inputs and v not in mechanisms]
        if missing:
            raise CausalModelError(f"variables {missing} have parents but no mechanism; give one for each")
        not_callable = [v for v, f in mechanisms.items() if not callable(f)]
        if not_callable:
            raise CausalModelError(f"mechanisms of {not_callable} are not callable")
        sinks = [v for v in names if graph.out_degree(v) == 0 and v not in inputs]
        if output is None:
            if len(sinks) != 1:
                raise CausalModelError(f"the model has sinks {sinks}: say which is the output (output=...)")
            output = sinks[0]
        elif output not in known:
            raise CausalModelError(f"output {output!r} is not a variable; variables are {names}")
        self.variables: tuple[str, ...] = tuple(names)
        self.parents: dict[str, tuple[str, ...]] = {v: tuple(parents.get(v, ())) for v in names}
        self.mechanisms: dict[str, Callable] = dict(mechanisms)
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.output = output
        self.graph = graph
        self.order: tuple[str, ...] = tuple(nx.lexicographical_topological_sort(graph, key=names.index))
        self.encode = encode if encode is not None else _concat_encode(self.inputs)
        self.sampler = sampler

    def __repr__(self) -> str:
        return f"CausalModel(inputs={list(self.inputs)}, output={self.output!r}, variables={list(self.variables)})"

    # -- evaluation ---------------------------------------------------------------------------
    def _check_names(self, names, what: str) -> None:
        bad = [n for n in names if n not in self.parents]
        if bad:
            raise CausalModelError(f"unknown variables {bad} in {what}; variables are {list(self.variables)}")

    def run(self, inputs: Mapping[str, Any], interventions: Mapping[str, Any] | None = None) -> Values:
        """Every variable's value on `inputs`, with `interventions` ({variable: value}) held fixed."""
        if not isinstance(inputs, Mapping):
            raise CausalModelError(f"inputs must be a mapping {{input variable: value}}, got {type(inputs).__name__}")
        interventions = dict(interventions or {})
        self._check_names(inputs, "inputs")
        self._check_names(interventions, "interventions")
        not_inputs = [n for n in inputs if n not in self.inputs]
        if not_inputs:
            raise CausalModelError(
                f"{not_inputs} are not input variables (inputs are {list(self.inputs)}); "
                "set computed variables with interventions=..."
            )
        missing = [n for n in self.inputs if n not in inputs and n not in interventions]
        if missing:
            raise CausalModelError(f"missing values for input variables {missing}")
        values: Values = {}
        for v in self.order:
            if v in interventions:
                values[v] = interventions[v]
            elif v in inputs:
                values[v] = inputs[v]
            else:
                values[v] = self.mechanisms[v](*(values[p] for p in self.parents[v]))
        return values

    def interchange(self, base: Mapping[str, Any], sources, variables) -> Values:
        """Run `base` with each variable set to its value on its source.

        `variables` is a name or a list; `sources` is one input mapping (shared by all variables) or a
        list with one mapping per variable. Returns every variable's value (like `run`).
        """
        names = [variables] if isinstance(variables, str) else list(variables)
        if not names:
            raise CausalModelError("interchange needs at least one variable")
        self._check_names(names, "interchange variables")
        if isinstance(sources, Mapping):
            sources = [sources] * len(names)
        elif not isinstance(sources, Sequence) or len(sources) != len(names):
            raise CausalModelError(
                f"sources must be one input mapping or a list of {len(names)} (one per variable), got {sources!r}"
            )
        fixed: dict[str, Any] = {}
        runs: dict[int, Values] = {}
        for name, source in zip(names, sources):
            if id(source) not in runs:
                runs[id(source)] = self.run(source)
            fixed[name] = runs[id(source)][name]
        return self.run(base, fixed)

    # -- sampling -----------------------------------------------------------------------------
    def sample_inputs(self, n: int, generator: torch.Generator | None = None,
                      sampler: Sampler | None = None) -> dict[str, torch.Tensor]:
        """`n` input settings (batched tensors) from `sampler` (default: the model's own)."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise CausalModelError("no input sampler: pass sampler=f(n, generator) here or to CausalModel(...)")
        if not isinstance(n, int) or n <= 0:
            raise CausalModelError(f"n must be a positive int, got {n!r}")
        values = dict(sampler(n, generator if generator is not None else torch.Generator().manual_seed(0)))
        missing = [v for v in self.inputs if v not in values]
        if missing:
            raise CausalModelError(f"the sampler returned no values for input variables {missing}")
        return {v: values[v] for v in self.inputs}

    def sample_counterfactuals(self, n: int, variables, generator: torch.Generator | None = None,
                               sampler: Sampler | None = None) -> CounterfactualDataset:
        """`n` (base, sources, label) examples intervening on `variables`.

        `variables`: a name, or a list of *groups*, one per source: ``["WX", "YZ"]`` takes WX from a
        first source and YZ from a second; ``[["WX", "YZ"]]`` takes both from one source. Bases and
        sources are independent draws of `sampler` (default generator: seeded with 0); the label is
        the output under the interchange.
        """
        groups = _groups(variables)
        self._check_names([v for g in groups for v in g], "counterfactual variables")
        if self.output in {v for g in groups for v in g}:
            raise CausalModelError(f"intervening on the output {self.output!r} makes the label trivial")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        base = self.sample_inputs(n, g, sampler)
        sources = tuple(self.sample_inputs(n, g, sampler) for _ in groups)
        fixed: dict[str, Any] = {}
        for group, source in zip(groups, sources):
            values = self.run(source)
            fixed.update({v: values[v] for v in group})
        labels = torch.as_tensor(self.run(base, fixed)[self.output]).long()
        base_labels = torch.as_tensor(self.run(base)[self.output]).long()
        return CounterfactualDataset(
            base=base, sources=sources, variables=groups, labels=labels, base_labels=base_labels,
            base_inputs=self.encode(base), source_inputs=tuple(self.encode(s) for s in sources),
        )


def _groups(variables) -> tuple[tuple[str, ...], ...]:
    if isinstance(variables, str):
        return ((variables,),)
    if not isinstance(variables, Sequence) or not variables:
        raise CausalModelError(f"variables must be a name or a non-empty list of names/groups, got {variables!r}")
    groups = tuple((g,) if isinstance(g, str) else tuple(g) for g in variables)
    flat = [v for g in groups for v in g]
    if any(not g for g in groups) or len(set(flat)) != len(flat):
        raise CausalModelError(f"variable groups must be non-empty and not repeat a variable, got {variables!r}")
    return groups


def _take(inputs: Inputs, index) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}


def _cat(parts: Sequence[Inputs]) -> Inputs:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass(frozen=True, eq=False)
class CounterfactualDataset:
    """Interchange examples, all batched: row i is (base, sources, label) number i.

    base / sources: the causal model's input values; base_inputs / source_inputs: the same encoded
    for the network. variables[g] are the variables taken from sources[g]. labels: the output under
    the interchange; base_labels: the output on the base alone (for a task loss).
    """

    base: Mapping[str, torch.Tensor]
    sources: tuple[Mapping[str, torch.Tensor], ...]
    variables: tuple[tuple[str, ...], ...]
    labels: torch.Tensor
    base_labels: torch.Tensor
    base_inputs: Inputs
    source_inputs: tuple[Inputs, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index) -> CounterfactualDataset:
        """A sub-dataset (int, slice, or index tensor); an int gives a batch of one."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return CounterfactualDataset(
            base=_take(self.base, index), sources=tuple(_take(s, index) for s in self.sources),
            variables=self.variables, labels=self.labels[index], base_labels=self.base_labels[index],
            base_inputs=_take(self.base_inputs, index),
            source_inputs=tuple(_take(s, index) for s in self.source_inputs),
        )

    @property
    def intervened(self) -> tuple[str, ...]:
        """Every variable this dataset intervenes on."""
        return tuple(v for g in self.variables for v in g)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Consecutive sub-datasets of `batch_size` rows (shuffled when a generator is given)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise CausalModelError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self[order[start:start + batch_size]]

    @staticmethod
    def concat(parts: Sequence[CounterfactualDataset]) -> CounterfactualDataset:
        """Rows of several datasets that intervene on the same variable groups."""
        if not parts:
            raise CausalModelError("concat needs at least one dataset")
        if len({p.variables for p in parts}) != 1:
            raise CausalModelError(
                f"concat needs datasets with the same variable groups, got {[p.variables for p in parts]}"
            )
        return CounterfactualDataset(
            base=_cat([p.base for p in parts]),
            sources=tuple(_cat([p.sources[g] for p in parts]) for g in range(len(parts[0].sources))),
            variables=parts[0].variables,
            labels=torch.cat([p.labels for p in parts]), base_labels=torch.cat([p.base_labels for p in parts]),
            base_inputs=_cat([p.base_inputs for p in parts]),
            source_inputs=tuple(_cat([p.source_inputs[g] for p in parts]) for g in range(len(parts[0].sources))),
        )
