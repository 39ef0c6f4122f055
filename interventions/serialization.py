"""Saving and loading interventions: a directory of JSON (what to rebuild) and safetensors (the tensors).

``save_interventions(path, {site: intervention})`` writes ``path/interventions.json`` — a format
version, each site with its selectors, and per module its registered class name, constructor
arguments and which saveable submodules it holds — and ``path/tensors.safetensors`` with the
parameters and buffers. No pickle anywhere. ``load_interventions(path)`` rebuilds every module
through the class registry (`registry.Saveable`), re-links shared submodules (a `Rotation` shared by
several interventions is one object again) and loads the tensors. Also here: `Site` <-> JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InterventionError
from .registry import Saveable, registered, saved_name
from .sites import Site, as_site

FORMAT = "interventions.saved"
VERSION = 1
JSON_FILE = "interventions.json"
TENSOR_FILE = "tensors.safetensors"


# -- sites -------------------------------------------------------------------------------------
def site_to_json(site: Site) -> dict:
    """A Site as plain JSON values (tensor positions as nested lists with their dtype)."""
    pos = site.positions
    if isinstance(pos, torch.Tensor):
        pos = {"tensor": pos.tolist(), "dtype": str(pos.dtype).removeprefix("torch.")}
    elif pos is not None:
        pos = list(pos)
    dims = site.dims
    if isinstance(dims, slice):
        dims = {"slice": [dims.start, dims.stop]}
    elif dims is not None:
        dims = list(dims)
    return {
        "name": site.name,
        "positions": pos,
        "heads": None if site.heads is None else list(site.heads),
        "dims": dims,
    }


def site_from_json(data) -> Site:
    """The Site `site_to_json` wrote (raises KeyError / TypeError / ValueError on malformed data)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a site must be a JSON object, got {data!r}")
    pos = data.get("positions")
    if isinstance(pos, Mapping):
        pos = torch.tensor(pos["tensor"], dtype=getattr(torch, pos["dtype"]))
    dims = data.get("dims")
    if isinstance(dims, Mapping):
        dims = slice(*dims["slice"])
    return Site(data["name"], positions=pos, heads=data.get("heads"), dims=dims)


# -- values of constructor arguments -------------------------------------------------------------
class _Writer:
    """Collects modules (one entry per object, so sharing survives) and tensors while encoding."""

    def __init__(self):
        self.ids: dict[int, str] = {}
        self.modules: dict[str, dict] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._keep: list = []  # keep encoded objects alive so their id() stays unique

    def module(self, module: nn.Module, where: str) -> str:
        if not isinstance(module, Saveable):
            raise InterventionError(
                f"cannot save {where}: {type(module).__name__} is not a saveable module. Interventions "
                "(subclasses of iv.Intervention) and iv.Rotation save; other modules may be held inside "
                "one as submodules."
            )
        key = self.ids.get(id(module))
        if key is not None:
            return key
        key = str(len(self.ids))
        self.ids[id(module)] = key
        self._keep.append(module)
        args, kwargs = module._saved_args
        name = saved_name(type(module))
        where = f"{name} (module {key})"
        entry = {"class": name}
        entry["args"] = [
            self.value(a, f"argument {i} of {where}", f"{key}/args/{i}") for i, a in enumerate(args)
        ]
        entry["kwargs"] = {
            k: self.value(v, f"argument {k!r} of {where}", f"{key}/kwargs/{k}") for k, v in kwargs.items()
        }
        children = {path: sub for path, sub in module.named_modules() if path and isinstance(sub, Saveable)}
        top = [p for p in children if not any(p.startswith(q + ".") for q in children)]
        entry["children"] = {p: self.module(children[p], f"submodule {p!r} of {where}") for p in top}
        state = {k: v for k, v in module.state_dict().items() if not any(k.startswith(p + ".") for p in top)}
        entry["state"] = sorted(state)
        for k, v in state.items():
            self.tensors[f"{key}/state/{k}"] = v.detach().to("cpu").contiguous().clone()
        self.modules[key] = entry
        return key

    def value(self, value, where: str, tensor_key: str):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            self.tensors[tensor_key] = value.detach().to("cpu").contiguous().clone()
            return {"$tensor": tensor_key}
        if isinstance(value, slice):
            return {
                "$slice": [self.value(v, where, tensor_key) for v in (value.start, value.stop, value.step)]
            }
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, Site):
            return {"$site": site_to_json(value)}
        if isinstance(value, nn.Module):
            return {"$module": self.module(value, where)}
        if isinstance(value, (list, tuple)):
            items = [self.value(v, f"{where}[{i}]", f"{tensor_key}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"$tuple": items}
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {
                "$dict": {k: self.value(v, f"{where}[{k!r}]", f"{tensor_key}/{k}") for k, v in value.items()}
            }
        raise InterventionError(
            f"cannot save {where}: a {type(value).__name__}. Constructor arguments may be None, bool, int, "
            "float, str, tensors, slices, dtypes, Sites, saveable modules, and lists / tuples / str-keyed "
            "dicts of those."
        )


def save_interventions(path, interventions: Mapping) -> Path:
    """Write ``{site: intervention}`` to the directory `path` (created if needed); returns the path.

    Everything is encoded (and any unsaveable argument reported) before a file is written.
    """
    path = Path(path)
    if not isinstance(interventions, Mapping) or not interventions:
        raise InterventionError("interventions must be a non-empty mapping {site: intervention}")
    writer = _Writer()
    entries = []
    for site, module in interventions.items():
        site = as_site(site)
        entries.append(
            {"site": site_to_json(site), "module": writer.module(module, f"the intervention at {site!r}")}
        )
    document = {"format": FORMAT, "version": VERSION, "entries": entries, "modules": writer.modules}
    if path.exists() and not path.is_dir():
        raise InterventionError(
            f"{path} exists and is not a directory; save_interventions writes a directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    save_file(writer.tensors, str(path / TENSOR_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
    (path / JSON_FILE).write_text(json.dumps(document, indent=1) + "\n")
    return path


# -- loading -------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, file: Path, tensor_file: Path, modules: Mapping, tensors: Mapping[str, torch.Tensor]):
        self.file, self.tensor_file, self.entries, self.tensors = file, tensor_file, modules, tensors
        self.built: dict[str, nn.Module] = {}
        self._building: set[str] = set()

    def fail(self, what: str):
        raise InterventionError(f"{self.file}: {what}")

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise InterventionError(
                f"{self.tensor_file}: tensor {key!r} is missing from it, but {self.file.name} "
                "needs it (the two files do not belong together?)"
            )
        return self.tensors[key].clone()  # its own memory, not the file's

    def module(self, key) -> nn.Module:
        if key in self.built:
            return self.built[key]
        entry = self.entries.get(key) if isinstance(key, str) else None
        if not isinstance(entry, Mapping):
            self.fail(f"module {key!r} is referenced but not described under 'modules'")
        if key in self._building:
            self.fail(f"module {key!r} refers to itself through its arguments")
        self._building.add(key)
        name = entry.get("class")
        cls = registered().get(name)
        if cls is None:
            known = ", ".join(sorted(registered()))
            self.fail(
                f"unknown intervention class {name!r} (module {key}). Known classes: {known}. A user-defined "
                "subclass registers itself when the module defining it is imported: import it before loading."
            )
        try:
            args = [self.value(a) for a in entry["args"]]
            kwargs = {k: self.value(v) for k, v in entry["kwargs"].items()}
            children = {p: self.module(c) for p, c in entry["children"].items()}
            state_keys = list(entry["state"])
        except InterventionError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            self.fail(f"malformed description of module {key} ({name}): {type(e).__name__}: {e}")
        try:
            module = cls(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any constructor failure is reported with the path
            self.fail(
                f"could not rebuild module {key}: {name}(*args, **kwargs) raised {type(e).__name__}: {e}"
            )
        for path, child in children.items():  # re-link shared submodules (the one object everyone held)
            parent, _, attr = path.rpartition(".")
            try:
                setattr(module.get_submodule(parent) if parent else module, attr, child)
            except (AttributeError, TypeError) as e:
                self.fail(f"module {key} ({name}) has no submodule {path!r} to re-link: {e}")
        state = {k: self.tensor(f"{key}/state/{k}") for k in state_keys}
        own = {k for k in module.state_dict() if not any(k.startswith(p + ".") for p in children)}
        if own != set(state):
            self.fail(
                f"module {key} ({name}) has tensors {sorted(own)} but the file holds {sorted(state)} for it "
                "(saved by a different version of the class?)"
            )
        try:
            # assign: the saved dtypes stay (a module moved to float64 after construction reloads as float64)
            module.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            self.fail(f"tensors of module {key} ({name}) do not fit it: {e}")
        self._building.discard(key)
        self.built[key] = module
        return module

    def value(self, value):
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, Mapping):
            return value
        ((tag, inner),) = value.items()
        if tag == "$tensor":
            return self.tensor(inner)
        if tag == "$slice":
            return slice(*(self.value(v) for v in inner))
        if tag == "$dtype":
            dtype = getattr(torch, inner, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {inner!r}")
            return dtype
        if tag == "$site":
            return site_from_json(inner)
        if tag == "$module":
            return self.module(inner)
        if tag == "$tuple":
            return tuple(self.value(v) for v in inner)
        if tag == "$dict":
            return {k: self.value(v) for k, v in inner.items()}
        raise ValueError(f"unknown value tag {tag!r}")


def load_interventions(path) -> dict[Site, nn.Module]:
    """The ``{site: intervention}`` dict `save_interventions` wrote to `path`, rebuilt in this process."""
    path = Path(path)
    file = path / JSON_FILE
    if not file.is_file():
        raise InterventionError(
            f"{path}: no {JSON_FILE} there; expected a directory written by save_interventions"
        )
    try:
        document = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InterventionError(f"{file}: damaged JSON ({e})") from None
    if not isinstance(document, Mapping) or document.get("format") != FORMAT:
        raise InterventionError(f"{file}: not a saved-interventions file (its 'format' is not {FORMAT!r})")
    if document.get("version") != VERSION:
        raise InterventionError(
            f"{file}: format version {document.get('version')!r}; this library reads version {VERSION}"
        )
    tensor_file = path / TENSOR_FILE
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise InterventionError(f"{tensor_file}: missing or damaged safetensors file ({e})") from None
    modules, entries = document.get("modules"), document.get("entries")
    if not isinstance(modules, Mapping) or not isinstance(entries, list):
        raise InterventionError(f"{file}: malformed: 'modules' must be an object and 'entries' a list")
    reader = _Reader(file, tensor_file, modules, tensors)
    out = {}
    for i, entry in enumerate(entries):
        try:
            site = site_from_json(entry["site"])
            module_key = entry["module"]
        except InterventionError as e:
            raise InterventionError(f"{file}: entry {i} has a bad site: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InterventionError(f"{file}: malformed entry {i}: {type(e).__name__}: {e}") from None
        out[site] = reader.module(module_key)
    return out
