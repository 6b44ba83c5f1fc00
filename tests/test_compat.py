"""Each private API of lit_adamerging._compat, checked against the installed dependency versions."""

from __future__ import annotations
