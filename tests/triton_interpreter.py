"""Triton kernels under the CPU interpreter, for the *_interpreter tests: tests/conftest.py sets
TRITON_INTERPRET=1 on hosts without CUDA, before triton is first imported."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch


def interpreted_module(name: str) -> Iterator[ModuleType]:
    """Yields module `name` (a kernels.triton file) for a module-scoped fixture; skips where
    triton is not installed (CI's CPU install), where CUDA is (the GPU tests run the compiled
    kernels there) and where triton was imported without the interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU tests cover the compiled kernel")
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if type(tl.cdiv).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    mp = pytest.MonkeyPatch()
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is not None:
        # The interpreter holds a loaded scalar as a 1-element array and int()s it for
        # `range(start, end)`; numpy >= 2.4 refuses int() of a 1-d array.
        def patched(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        mp.setattr(interp, "_patch_lang_tensor", patched)
    yield importlib.import_module(name)
    mp.undo()
