"""Hatchling build hook: ship the lazy CLI-hook ``.pth`` in editable installs too.

Regular wheels get ``anomalib_moleflow_cli_hook.pth`` through
``[tool.hatch.build.targets.wheel.force-include]``. For ``pip install -e .``
hatchling builds a separate editable wheel that only honours
``build_data["force_include_editable"]`` (older hatchling releases ignore the
``force-include`` table there), so the file is added here explicitly.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_FILE = "anomalib_moleflow_cli_hook.pth"


class CustomBuildHook(BuildHookInterface):
    """Adds the CLI-hook ``.pth`` to the root of editable wheels."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            build_data.setdefault("force_include_editable", {})[PTH_FILE] = PTH_FILE
