"""bench.py's parts: the naive tutorial baseline, the scale and shipped-model benchmarks, process memory, the GPU check script."""
