# Triton kernels run on CPU through the interpreter when no GPU is present; TRITON_INTERPRET must be set
# before any kernel module is imported (sinkfree_kernels reads it at import).
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
