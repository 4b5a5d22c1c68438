"""Session-wide test setup."""

import os

import pytest
import torch

# Triton kernels are checked on machines without a GPU through Triton's interpreter. triton.jit reads the
# flag when a kernel is defined, i.e. when a lorakit module that defines kernels is first imported, which
# may be any test file's import: so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _single_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads cost
    5-20x; the previous thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; a single test asks for
# ``one_thread_test`` by name
one_thread = pytest.fixture(scope="module", name="one_thread")(_single_thread)
one_thread_test = pytest.fixture(name="one_thread_test")(_single_thread)
