import os

# Triton kernels run on CPU tensors only under the interpreter, which must be selected
# before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
