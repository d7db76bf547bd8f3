"""The allocator settings applied at setup (engine/memory_release.py); the plateau they give is
measured through the real server in tests/test_http_soak.py."""

from __future__ import annotations

import pytest

from engine import memory_release

needs_glibc = pytest.mark.skipif(
    getattr(memory_release._libc(), "mallopt", None) is None, reason="no glibc mallopt here"
)


@needs_glibc
def test_setup_applies_both_allocator_settings() -> None:
    assert memory_release.configure_allocator({}) == {
        "MALLOC_ARENA_MAX": 2,
        "MALLOC_MMAP_THRESHOLD_": 4 * 2**20,
    }


@needs_glibc
def test_an_operators_environment_variable_wins() -> None:
    applied = memory_release.configure_allocator({"MALLOC_ARENA_MAX": "8"})
    assert applied == {"MALLOC_MMAP_THRESHOLD_": 4 * 2**20}
