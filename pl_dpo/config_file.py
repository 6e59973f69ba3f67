"""Config files load from any working directory (no jax here).

A config file imports its siblings as a package (`from configs.common import base`), which Python finds only
where the folder above `configs/` is on the import path: the repository root when run from there. For
`--config=/abs/path/configs/demo.py` run elsewhere, that folder is added to the path before the file loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def config_paths(argv: Sequence[str]) -> list[str]:
    """The config files named by `--config=PATH[:arg]` or `--config PATH[:arg]` in `argv`."""
    paths = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
    return [p.split(":", 1)[0] for p in paths if p]


def make_importable(argv: Sequence[str]) -> None:
    """Puts the folder above each named config file's folder at the end of `sys.path` (the working directory
    and installed packages keep precedence)."""
    for path in config_paths(argv):
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.append(root)
