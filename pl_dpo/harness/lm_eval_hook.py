"""Lets lm-eval's own command find pl_dpo's backend: `lm_eval --model pl_dpo --model_args path=...`.

lm-eval 0.4 finds backends by import only: its registry reads no package entry points. So pl_dpo's install puts a
one-line `pl_dpo_lm_eval.pth` into site-packages (`setup.py`), which Python runs at start-up and which imports this
module. All it does is add an import hook: when lm-eval imports `lm_eval.models`, its catalogue of backends (names
and where to import them from), the hook adds `pl_dpo` to that catalogue the same way. Until lm-eval asks for the
backend, nothing of pl_dpo, jax or lm-eval is imported.
"""

from __future__ import annotations

import importlib.abc
import sys

CATALOGUE = "lm_eval.models"
NAME = "pl_dpo"
BACKEND = "pl_dpo.harness.lm:PlDpoLM"  # as lm-eval's own catalogue writes its backends


def register(model_registry) -> None:
    """Adds `pl_dpo` to lm-eval's model registry, unless pl_dpo.harness.lm has registered it already."""
    if NAME not in model_registry:
        model_registry.register(NAME, target=BACKEND)


class _ThenRegister(importlib.abc.Loader):
    """Runs the catalogue's own loader, then registers the backend."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from lm_eval.api.registry import model_registry

        register(model_registry)

    def __getattr__(self, name: str):  # get_filename, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


class _CatalogueFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it for `lm_eval.models` and wraps the loader they give."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname != CATALOGUE:
            return None
        sys.meta_path.remove(self)  # once: lm-eval's catalogue is imported once per process
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


def install() -> None:
    """Called by the .pth line. A process that has imported lm-eval's catalogue already gets the entry at once."""
    if CATALOGUE in sys.modules:
        register(sys.modules["lm_eval.api.registry"].model_registry)
    elif not any(isinstance(finder, _CatalogueFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CatalogueFinder())
