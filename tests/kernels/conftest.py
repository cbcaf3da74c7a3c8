import pytest


@pytest.fixture(autouse=True)
def no_tf32(ieee_fp32):
    """Every kernel test compares in IEEE fp32 (tests/conftest.py's ieee_fp32)."""
    yield
