"""Every forward hook oocrlab puts on a model goes through one owner, `Hooks`, which keeps the handles and
removes them all together: on leaving its `with` block (the probe's activation patching) or on `close()` (a hook
adapter, whose hooks live as long as it does). No handle is dropped, so no hook outlives what registered it.
"""

from __future__ import annotations

import contextlib

import torch


class Hooks(contextlib.AbstractContextManager):
    def __init__(self):
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def after(self, module: torch.nn.Module, fn, prepend: bool = False) -> None:
        """fn(module, args, output) after module's forward; `prepend` runs it before hooks already there."""
        self.handles.append(module.register_forward_hook(fn, prepend=prepend))

    def before(self, module: torch.nn.Module, fn) -> None:
        """fn(module, args, kwargs) before module's forward, returning None or new (args, kwargs)."""
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __exit__(self, *exc) -> None:
        self.close()
