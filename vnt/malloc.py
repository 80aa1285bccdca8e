"""glibc malloc settings for training and benchmarks (no imports: launch/train.sh loads this file
before torch).

``GLIBC_TUNABLES=MALLOC_TUNABLES``: never serve an allocation by mmap, never trim the heap.
PyTorch's CPU allocator hands every large buffer to malloc; by default glibc maps each one fresh
and unmaps it when it is freed, so every training step page-faults its activations in again. The
main job (launch/train.sh) and the benchmark session run with these settings unless the
environment already sets GLIBC_TUNABLES; bench/test_allocator.py measures steps with and without.
"""
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
