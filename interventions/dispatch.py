"""Models dispatched by `accelerate` (``device_map``, `cpu_offload`, `disk_offload`): where a module runs, and tidying up.

accelerate does not use torch hooks: it wraps a module's ``forward`` and keeps its `AlignDevicesHook` in
``module._hf_hook``, which moves the inputs to the module's *execution device* and, for offloaded
modules, loads the weights there for the call and puts them back on ``meta`` afterwards. The core only
reads those hooks (duck-typed, so accelerate stays optional) and never adds, removes or replaces one.
"""

from __future__ import annotations

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks of `module` (a `SequentialHook` unpacked), or []."""
    hook = module.__dict__.get("_hf_hook")  # set as a plain attribute; a dict lookup keeps plain models cheap
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs `module` on, or None for a module it does not manage."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def to_execution_device(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """`value` on `module`'s execution device (unchanged for a module accelerate does not manage)."""
    device = execution_device(module)
    return value if device is None or value.device == device else value.to(device)


def _loaded(module: nn.Module, hook) -> bool:
    """Whether an offloading hook's weights are materialised, i.e. not back on ``meta``."""
    recurse = bool(getattr(hook, "place_submodules", False))
    tensors = list(module.parameters(recurse=recurse))
    if getattr(hook, "offload_buffers", False):
        tensors += list(module.buffers(recurse=recurse))
    return any(t.device.type != "meta" for t in tensors)


def release_offloaded(model: nn.Module) -> None:
    """Put offloaded weights back on ``meta`` after a forward that ended inside a module.

    accelerate offloads a module's weights when its forward returns; a forward cut short by an
    exception (`StopForward` of `get_value`, an error in an intervention) skips that step for every
    module it was inside (notably blocks loaded whole through ``preload_module_classes``), which would
    leave those weights on the execution device until the next complete call. A model accelerate has
    not dispatched as a whole (no hook on its root, no ``hf_device_map``) is skipped at once.
    """
    if model.__dict__.get("_hf_hook") is None and not model.__dict__.get("hf_device_map"):
        return
    for module in model.modules():
        for hook in _hooks(module):
            if getattr(hook, "offload", False) and _loaded(module, hook):
                hook.post_forward(module, None)
