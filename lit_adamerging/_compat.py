"""The private APIs of our dependencies that this library still needs, each behind a version guard.

Everything that reaches into a dependency's internals lives here and nowhere else, with the reason,
the versions it was checked against, and a test in tests/test_compat.py. A dependency version
outside the checked range raises a clear error at the call instead of misbehaving.
"""

from __future__ import annotations
