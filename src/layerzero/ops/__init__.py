"""One module per op family. Each defines the public functions of its family and an OpFamily per
function (family.py): the plan-cache key, the context builder, the binding, and what tracing,
measuring and solving need. Importing this package imports them all.
"""

from __future__ import annotations

import importlib
import pkgutil

from .family import FAMILIES, IMPLIED, OP_FAMILIES, OpFamily, families_for, is_op_id, op_matches

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("family", "library"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "IMPLIED", "OP_FAMILIES", "OpFamily", "families_for", "is_op_id", "op_matches"]
