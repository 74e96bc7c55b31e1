import os

# One intra-op thread per process: multi-process tests share 2 cores, and
# oversubscription makes them slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton kernels run in Triton's interpreter on this CPU-only test machine. Triton decides when a kernel
# is decorated, so this must hold before any test module imports one (tests/test_fused_rope.py and the
# model tests that select the fused kernel).
os.environ.setdefault("TRITON_INTERPRET", "1")
