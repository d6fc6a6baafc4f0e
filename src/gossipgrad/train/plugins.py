"""Plug-ins named on the command line: ``--dataset my_module:make_data`` and
``--model path/to/file.py:make_model`` name a callable that the job imports and calls.

``import_callable`` finds it (a module on the path, a file, or ``./module.py``);
``check_options`` refuses keyword options the callable does not take, naming those it does.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def check_options(fn: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """Raise a ValueError naming the allowed options when ``options`` has one ``fn`` lacks."""
    params = inspect.signature(fn).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    allowed = [p for p in allowed if p != "seed"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {what}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}"
        )


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable named by ``"module:attr"`` or ``"path/file.py:attr"`` (a plain module name
    that is not importable is also looked for as ``./module.py``)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"bad {what} spec {spec!r}: expected 'module:function' or 'path/file.py:function'"
        )
    module = _import_module(module_name, spec, what)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ValueError(
                f"{what} spec {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                f"it has: {', '.join(names) or 'nothing public'}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{what} spec {spec!r}: {attr!r} is not callable")
    return fn


def _import_module(module_name: str, spec: str, what: str) -> Any:
    file = Path(module_name)
    if module_name.endswith(".py") or os.sep in module_name:
        return _import_file(file, spec, what)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing != module_name and not module_name.startswith(missing + "."):
            raise  # the user's module imports something that is missing: show that
        local = Path.cwd() / f"{module_name}.py"
        if "." not in module_name and local.is_file():
            return _import_file(local, spec, what)
        raise ValueError(
            f"{what} spec {spec!r}: cannot import module {module_name!r} ({error}); put its "
            "folder on PYTHONPATH or give a file path, e.g. 'path/to/file.py:function'"
        ) from None


def _import_file(file: Path, spec: str, what: str) -> Any:
    if not file.is_file():
        raise ValueError(f"{what} spec {spec!r}: file {str(file)!r} not found")
    name = file.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(file.resolve()):
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file.resolve())
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} spec {spec!r}: cannot load {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so that its classes pickle (DataLoader workers, checkpoints)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
