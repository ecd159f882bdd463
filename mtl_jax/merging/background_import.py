"""numba-compiled kernel modules imported in a background thread.

numba's start-up (its import, its compiler's registries, which import ``scipy.linalg``, and the
cached machine code) costs ~0.5 s of CPU, a whole pass of a 100M-parameter merge; so a merge asks for
its fused kernels with :func:`background_import` when it starts, runs its numpy kernels until
:meth:`BackgroundImport.ready` returns the module, and switches chunk by chunk (both give the same
bits). ``MTL_JAX_NUMPY_KERNELS=1``, or numba not installed (the ``fast`` extra), keeps numpy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import types
from typing import Optional

NUMPY_KERNELS_ENV = "MTL_JAX_NUMPY_KERNELS"  # set to 1: the numpy kernels even where numba is installed


def numba_kernels_wanted() -> bool:
    """numba is installed and ``MTL_JAX_NUMPY_KERNELS`` is unset or 0."""
    return os.environ.get(NUMPY_KERNELS_ENV, "") in ("", "0") and importlib.util.find_spec("numba") is not None


class BackgroundImport:
    """Imports ``module`` (then calls its ``warm_up()``, if it has one) in a daemon thread."""

    def __init__(self, module: str):
        self.name = module
        self._module: Optional[types.ModuleType] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._load, name=f"import-{module}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            module = importlib.import_module(self.name)
            if hasattr(module, "warm_up"):
                module.warm_up()
            self._module = module
        except BaseException as e:  # re-raised on the merge's threads by ready()
            self._error = e

    def ready(self) -> Optional[types.ModuleType]:
        """The module once imported, else None (still loading); RuntimeError if the import failed."""
        if self._error is not None:
            raise RuntimeError(f"importing {self.name} failed (set {NUMPY_KERNELS_ENV}=1 to use the numpy "
                               f"kernels)") from self._error
        return self._module

    def wait(self) -> types.ModuleType:
        """The module, waiting for its import."""
        self._thread.join()
        return self.ready()


_IMPORTS: dict[str, BackgroundImport] = {}
_LOCK = threading.Lock()


def background_import(module: str) -> Optional[BackgroundImport]:
    """The process's :class:`BackgroundImport` of ``module`` (started on the first call), or None
    where the numpy kernels are to be used (:func:`numba_kernels_wanted`)."""
    if not numba_kernels_wanted():
        return None
    with _LOCK:
        if module not in _IMPORTS:
            _IMPORTS[module] = BackgroundImport(module)
    return _IMPORTS[module]
