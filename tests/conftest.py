"""Shared fixtures of the float64 reference tests (the environment is set in ../conftest.py)."""
import pytest
from helpers import REFERENCE_STEPS
from references import noisy_quadratic


@pytest.fixture(scope="session")
def problem():
  """(w0, grad_fn): a noisy quadratic on two leaves for REFERENCE_STEPS steps."""
  return noisy_quadratic(REFERENCE_STEPS)
