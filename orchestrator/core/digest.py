"""SHA-256 of bytes, as hex: the journal's policy digests and the lock files' names.

`hashlib` loads OpenSSL when imported (a cost every start of the program would pay); CPython's own SHA-256
(the module hashlib falls back on) gives the same digest without it. hashlib where a build lacks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_sha256: Callable[[bytes], Any]
try:
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]  # 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]  # 3.11
    except ImportError:  # pragma: no cover - a Python built without them
        from hashlib import sha256 as _sha256


def sha256_hex(data: bytes) -> str:
    """The SHA-256 digest of `data` in hexadecimal, as hashlib.sha256(data).hexdigest()."""
    return str(_sha256(data).hexdigest())
