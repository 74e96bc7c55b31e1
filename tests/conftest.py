import os

# One intra-op thread per process: multi-process tests share 2 cores, and
# oversubscription makes them slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
