"""Speed and memory benchmarks (`examples/benchmark.py`, `examples/bench_gpu.sh`)."""
