"""Fixtures for the core test-suite: the PyTorch oracle and the shared helpers.

Oracle tests (``@pytest.mark.oracle``) compare shardgrad.core against PyTorch. Without
torch installed they are skipped with a clear reason instead of failing.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ORACLE_REASON = "oracle tests need the oracle extra: pip install -e '.[oracle]'"

# The helpers live next to this file (core_helpers.py); make them importable whatever
# pytest import mode is in use.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def pytest_collection_modifyitems(config, items):
    """Skip every oracle-marked test under tests/core when torch is not importable."""
    if torch_available():
        return
    skip = pytest.mark.skip(reason=ORACLE_REASON)
    for item in items:
        if item.get_closest_marker("oracle") and str(item.path).startswith(_HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def torch():
    """The PyTorch module (the oracle), or a skip with the reason to install it."""
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip(ORACLE_REASON)
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def oracle(torch):
    """The helper module with ``check`` & co., once torch is known to be there."""
    import core_helpers

    return core_helpers
