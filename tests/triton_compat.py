"""The Triton interpreter on numpy >= 2.4, for test sessions (imported by tests/conftest.py).

Triton 3.6's interpreter (and older ones) turns a scalar Triton tensor into a Python int with
``int(self.handle.data)``, where ``data`` is a 1-element, 1-D numpy array. numpy 2.4 removed that conversion
(only 0-d arrays convert), so every interpreted kernel that uses a scalar as an index fails with
"TypeError: only 0-dimensional arrays can be converted to Python scalars". Triton 3.8 reads
``int(self.handle.data.squeeze())`` instead.

Rather than pin numpy for everyone, a test session whose interpreter has the old line gets the same
one-line fix (the interpreter's own patch scope then restores it after each launch, as it does for its own
patches). The pytest header says when it was applied. Nothing in the library depends on this: on a GPU the
interpreter is not used, and the library never sets TRITON_INTERPRET.
"""

from __future__ import annotations

import inspect

__all__ = ["fix_interpreter_scalar_index"]

_OLD_LINE = "int(self.handle.data))"


def fix_interpreter_scalar_index() -> str | None:
    """Apply the fix where the interpreter needs it; returns a line for the pytest header, or None."""
    import numpy as np
    import triton
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return None
    try:
        source = inspect.getsource(patch_tensor)
    except (OSError, TypeError):
        return None
    numpy_major_minor = tuple(int(p) for p in np.__version__.split(".")[:2])
    if _OLD_LINE not in source or numpy_major_minor < (2, 4):
        return None

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        # .item() converts a 1-element array of any rank, as Triton 3.8's squeeze() does
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    return (
        f"triton {triton.__version__} interpreter: scalar __index__ fixed for numpy {np.__version__} "
        "(tests/triton_compat.py)"
    )
