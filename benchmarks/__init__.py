"""lora-sweep's benchmarks: `make bench` (cpu_bench.py) and `make bench-gpu` (gpu_bench.py); results in BENCHMARKS.md.

A package so the smoke test (tests/test_benchmarks.py) can import the measurement code it checks.
"""
