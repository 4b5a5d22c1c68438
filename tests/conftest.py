"""Session-wide test setup."""

import os

import torch

# Triton kernels are checked on machines without a GPU through Triton's interpreter. triton.jit reads the
# flag when a kernel is defined, i.e. when a lorakit module that defines kernels is first imported, which
# may be any test file's import: so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
