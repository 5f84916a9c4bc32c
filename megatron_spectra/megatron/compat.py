"""Where megatron-core releases differ, one answer for both (tested: 0.16.1 on Python 3.11,
0.19.2 on Python 3.12; scripts/test.sh runs both).

Every function imports megatron-core when called, so importing this module costs nothing.
What differs, and who asks:
- `GroupedMLP` (all local experts in one tensor, without Transformer Engine) is gone in
  0.19, whose grouped layouts are `TEGroupedMLP` and its subclasses: `moe_expert_classes`
  (layouts.py).
"""

from __future__ import annotations

import importlib


class _Absent:
    """Stands for a megatron-core class this release does not have: nothing is an instance."""


def optional_class(module: str, name: str) -> type:
    """`module.name`, or a class nothing is an instance of where this release lacks it."""
    return getattr(importlib.import_module(module), name, _Absent)


def moe_expert_classes() -> tuple[type, type, type]:
    """(SequentialMLP, TEGroupedMLP, GroupedMLP) of this release; GroupedMLP may be absent."""
    experts = "megatron.core.transformer.moe.experts"
    module = importlib.import_module(experts)
    return module.SequentialMLP, module.TEGroupedMLP, optional_class(experts, "GroupedMLP")
