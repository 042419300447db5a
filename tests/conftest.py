"""Shared pytest fixtures and constants."""
from __future__ import annotations

from pathlib import Path

import pytest

# Real micrographs live in the shared folder beside the repository clone (../shared), both here
# and in CI; they are development material, not part of the repository.
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference-images"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder with the real reference micrographs (fails loudly if it is missing)."""
    assert REFERENCE_DIR.is_dir(), (
        f"reference images not found at {REFERENCE_DIR}; the shared folder must sit beside the "
        "repository clone (../shared/reference-images)")
    return REFERENCE_DIR
