"""Environment for the tests and the doctests: JAX on the CPU with 8 fake devices (the sharding
tests need them), set before JAX starts; a compilation cache for the training-script runs."""
import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session", autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
  """The tests start the training script some 40 times with the same few programs: subprocesses
  share a persistent compilation cache under pytest's temporary directory (half of each start).
  This process imported JAX before the fixture ran, so its own compiles are not cached; the
  TPU-compiler subprocesses turn the cache off (each of their programs is compiled once)."""
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  yield
  for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    os.environ.pop(key, None)
