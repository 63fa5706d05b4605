"""Bridges from cg_fast to other people's libraries, each imported only when used.

    from cg_fast.integrations.diffusers import CompressGuidance, DiTAdapter, diffusers_sampler

Nothing here is imported by ``import cg_fast``: an integration's own dependency (diffusers, from the
``[diffusers]`` extra) is needed only by the code that asks for it, and a missing one is an ImportError that
says what to install (:func:`require`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

# the extra that provides each integration's dependency, and the versions it was tested with
_EXTRAS = {"diffusers": ("diffusers", "diffusers>=0.42,<0.43 (tested: 0.42.1)")}


def require(module: str) -> ModuleType:
    """Import ``module`` (an integration's dependency) or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra, versions = _EXTRAS.get(module, (module, module))
        raise ImportError(
            f"cg_fast.integrations.{module} needs {module}, which is not installed ({e}): install the extra with "
            f"pip install 'cg_fast[{extra}]' (or pip install '{versions.split(' ')[0]}'); the rest of cg_fast "
            "works without it", name=module) from e
