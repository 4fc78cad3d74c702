import os

# Triton kernels run on CPU tensors under the interpreter (before triton is imported anywhere).
os.environ.setdefault("TRITON_INTERPRET", "1")
