"""State dicts written before checkpoint format 2, renamed onto today's module names.

Before format 2 the score thresholds lived under ``normalizer.stats.<task>`` (NaN meaning "not
fitted", no flag), the router's prototypes under ``router.slots.<task>`` (or
``router.prototype.slots.<task>`` for the hybrid router), and the task list outside the state
dict. Today every per-task statistic is a :class:`~.task_statistics.TaskStatistics` under
``<module>.tasks.<task>`` with a ``fitted`` flag, and the task list is the torch model's extra
state.
"""

from __future__ import annotations

import math

import torch

_RENAMES = (("router.prototype.slots.", "router.tasks."), ("router.slots.", "router.tasks."), ("normalizer.stats.", "thresholds.tasks."))


def migrate_legacy_keys(state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Rename pre-format-2 keys under ``prefix`` in place (a no-op for today's state dicts)."""
    for old, new in _RENAMES:
        head = prefix + old
        for name in [n for n in state_dict if n.startswith(head)]:
            state_dict[prefix + new + name[len(head) :]] = state_dict.pop(name)
            if old == "normalizer.stats." and name.endswith(".image_threshold"):
                flag = prefix + new + name[len(head) : -len("image_threshold")] + "fitted"
                value = float(state_dict[prefix + new + name[len(head) :]])
                state_dict[flag] = torch.tensor(math.isfinite(value))


def task_keys_in(state_dict: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Expert keys of a (migrated) state dict, in order: every expert has score thresholds."""
    head = prefix + "thresholds.tasks."
    keys = dict.fromkeys(n[len(head) :].split(".", 1)[0] for n in state_dict if n.startswith(head))
    return sorted(keys, key=lambda k: (len(k), k))
