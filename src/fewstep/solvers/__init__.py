"""Solvers: each module in this package registers one solver family on the shared core (`_core`)."""

import importlib
import pkgutil

from ._core import GridValues, Run, SolverSpec, get_solver, grid_values, register, reindex, solver_specs

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GridValues", "Run", "SolverSpec", "get_solver", "grid_values", "register", "reindex", "solver_specs"]
