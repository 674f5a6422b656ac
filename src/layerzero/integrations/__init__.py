"""Framework integrations, each imported on demand (none is imported by `import layerzero`). The
`torch.ops.layerzero.*` custom ops that torch.compile and torch.export see in place of the `lz.*` calls
are the op families' own (ops/library.py).


- `layerzero.integrations.transformers`: the "layerzero" attention implementation of Hugging Face
  transformers and `patch(model)` / `unpatch(model)` for norms, RoPE and gated MLPs. It registers
  itself as soon as transformers' attention registry exists (`watch_transformers`), so
  `attn_implementation="layerzero"` works after `import layerzero` alone.
- `layerzero.integrations.diffusers`: an attention processor for diffusers UNet and DiT models.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from typing import Any

log = logging.getLogger("layerzero")

# transformers' AttentionInterface lives in this module; registering needs it, importing it costs seconds.
TRANSFORMERS_REGISTRY = "transformers.modeling_utils"


def watch_transformers() -> None:
    """Register attn_implementation="layerzero" with transformers now if its attention registry is
    loaded, else right after it loads (a one-shot import hook: `import layerzero` imports nothing of
    transformers, and a process that never loads it pays nothing)."""
    if TRANSFORMERS_REGISTRY in sys.modules:
        _register_transformers()
    elif not any(isinstance(f, _AfterImport) and f.name == TRANSFORMERS_REGISTRY for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(TRANSFORMERS_REGISTRY, _register_transformers))


def _register_transformers() -> None:
    try:
        importlib.import_module("layerzero.integrations.transformers")  # registers at import
    except Exception as e:  # an unexpected transformers must not break the user's import of it
        log.warning(
            "layerzero: attn_implementation='layerzero' is not registered with transformers: %s: %s; "
            "import layerzero.integrations.transformers to see why",
            type(e).__name__,
            e,
        )


class _AfterImport:
    """A meta-path finder that runs `then()` once, right after module `name` has executed.

    It finds the module with the finders behind it and wraps only that spec's loader's
    exec_module (the loader object stays the module's own, so source lookups keep working).
    """

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        inner, then = loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            try:
                inner(module)
            finally:
                loader.__dict__.pop("exec_module", None)  # the loader's own method again
            then()

        loader.exec_module = exec_module
        return spec
