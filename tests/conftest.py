"""Set before anything imports triton: `triton.jit` picks the interpreter when a kernel is defined, and
any test module may import the kernel modules first (through `service` -> `kernels.ops`). The other
tests run the torch path (`LORASERVE_KERNELS=auto` on CPU tensors), which this does not touch."""

import os

# `make gpu-check` runs the CUDA tests with the real compiler: LORASERVE_TEST_INTERPRET=0.
if os.environ.get("LORASERVE_TEST_INTERPRET", "1") != "0":
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster for the session (tests.pg_cluster); each test makes its own database."""
    from tests.pg_cluster import cluster_for_tests

    yield from cluster_for_tests()
