"""Shared fixtures: every replay test runs on both replayers (C and pure Python)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import walstore
import walstore.replay as replay_mod

REQUIRE_NATIVE = os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1"


def native_module():  # type: ignore[no-untyped-def]
    try:
        from walstore import native
    except ImportError:
        return None
    return native


def _native_built() -> bool:
    try:
        import walstore._walstore_native  # noqa: F401
    except ImportError:
        return False
    return native_module() is not None


@pytest.fixture(params=["c", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once with the C replayer and once with the pure-Python one."""
    native = native_module()
    if request.param == "c":
        if not _native_built():
            if REQUIRE_NATIVE:
                pytest.fail("the C replayer did not build, and WALSTORE_REQUIRE_NATIVE=1")
            pytest.skip("the C replayer is not built here (set WALSTORE_REQUIRE_NATIVE=1 to make this fail)")
        monkeypatch.setattr(native, "AVAILABLE", True)
    elif native is not None:
        monkeypatch.setattr(native, "AVAILABLE", False)
    assert walstore.backend() == request.param
    assert replay_mod.backend() == request.param
    yield request.param
