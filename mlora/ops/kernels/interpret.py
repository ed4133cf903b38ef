"""Triton's CPU interpreter: detection, and a fix that lets loaded loop bounds work in it."""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fix_interpreter_scalars() -> None:
    """Let `range(lo, hi)` over loaded bounds run under TRITON_INTERPRET=1 with NumPy ≥ 2.4.

    Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into
    Python ints with int(array), which NumPy 2.4 refuses for arrays of ndim > 0. Its
    __index__ patch is replaced by one that reads the element. Compiled kernels never
    see this code.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mlora_scalar_fix", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mlora_scalar_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    fix_interpreter_scalars()
