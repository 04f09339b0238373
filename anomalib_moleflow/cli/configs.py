"""``anomalib-moleflow configs``: the YAML configs shipped with the package, by name.

    anomalib-moleflow configs                      # name, file and description of each
    anomalib-moleflow configs --path moleflow      # the file of one (for $(...) in a shell)
    anomalib-moleflow configs --show mvtec_real    # its text (to copy and edit)

Also :class:`ConfigFileOrName`, the ``--config`` action that takes a file or one of these names.
"""

from __future__ import annotations

import os
import re
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from anomalib_moleflow.configs_catalog import (
    description,
    looks_like_name,
    resolve_config,
    shipped_configs,
)

HELP = "list the shipped configs (names usable as --config NAME)"


class ConfigFileOrName(ActionConfigFile):
    """``--config``: a YAML file, a YAML string, or the name of a shipped config (a real file wins)."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:  # noqa: ANN401
        """Replace a config name by its file, then read it as :class:`ActionConfigFile` does."""
        if isinstance(values, str) and _is_name(values):
            try:
                values = str(resolve_config(values))
            except ValueError as exc:
                msg = f'Parser key "{self.dest}": {exc}'
                raise TypeError(msg) from None
        super().__call__(parser, cfg, values, option_string)


def _is_name(value: str) -> bool:
    """``value`` is neither an existing file nor YAML text, and is written like a name."""
    return not os.path.isfile(value) and not re.search(r"[\s:{}\[\]=,]", value) and looks_like_name(value)


def parser() -> ArgumentParser:
    """The subcommand's parser."""
    parser = ArgumentParser(description="List the YAML configs shipped with the package.")
    parser.add_argument("--path", type=str | None, default=None, help="print only the file of config NAME")
    parser.add_argument("--show", type=str | None, default=None, help="print the text of config NAME")
    return parser


def run(cfg: Any) -> int:  # noqa: ANN401 - the parsed namespace
    """Print the list, one config's file (``--path``) or its text (``--show``)."""
    if cfg.path is not None:
        print(resolve_config(cfg.path).resolve())
        return 0
    if cfg.show is not None:
        print(resolve_config(cfg.show).read_text(encoding="utf-8"), end="")
        return 0
    configs = shipped_configs()
    width = max(len(name) for name in configs)
    for name, path in configs.items():
        print(f"{name:<{width}}  {path}")
        print(f"{'':<{width}}  {description(path)}")
    return 0
