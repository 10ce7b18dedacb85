"""The parts of `make gpu-check` (benchmarks/gpu_check.py runs them): parts.py (sizes, budgets, the results file,
the GPU peaks), inproc.py (throughput against an open_clip_train step, MFU, memory, loss costs), resume.py (NCCL
kill -9 and resume), rows.py (subprocess rows against the real open_clip_train), report.py (BENCHMARKS.md)."""
