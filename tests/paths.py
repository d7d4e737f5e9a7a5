"""Where the tests find the repository's files (tests run from a checkout; the package itself never
looks for its repository)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository checkout under test
FIXTURES = ROOT / "tests" / "data"
EXAMPLE_DATA = ROOT / "examples" / "data"
MEGNET_SLICE = EXAMPLE_DATA / "megnet_slice.json.gz"
MEGNET_SPLIT = EXAMPLE_DATA / "megnet_slice_split.json"


def require(path: Path) -> Path:
    """``path`` if it exists, else fail the test with a message naming the missing file."""
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (it is part of the repository; restore it with "
                    f"`git checkout -- {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`)",
                    pytrace=False)
    return path
