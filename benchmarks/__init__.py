"""lora-sweep's benchmarks, one suite in three parts: `make bench` (cpu.py), `make bench-gpu` (gpu.py) and
`make bench-sdxl` (sdxl.py). They share measure.py (lora-sweep's train() timed against bare_loop.py) and report.py,
the one writer of BENCHMARKS.md and benchmarks/results/; tests/test_benchmarks.py checks their logic."""
