import os

import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter (set before triton is
# imported anywhere); on a GPU machine they compile for the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
