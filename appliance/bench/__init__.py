"""Benchmarks: our figures beside the peers', in one run (make bench, bench-serve, bench-offload, gpu-check).
No product module imports it."""
