"""Session-wide test setup."""

import os

import pytest
import torch

# Triton kernels are checked on machines without a GPU through Triton's interpreter. triton.jit reads the
# flag when a kernel is defined, i.e. when a lorakit module that defines kernels is first imported, which
# may be any test file's import: so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# imported after the flag: a lorakit module may define Triton kernels
from lorakit._threads import one_thread as single_thread


def _single_thread():
    """Tiny models gain nothing from threads (lorakit._threads.one_thread says why)."""
    with single_thread():
        yield


# a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; a single test asks for
# ``one_thread_test`` by name
one_thread = pytest.fixture(scope="module", name="one_thread")(_single_thread)
one_thread_test = pytest.fixture(name="one_thread_test")(_single_thread)
