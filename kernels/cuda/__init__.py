"""CUDA kernel sources (.cu), their ahead-of-time build into one fatbin, and the fatbin's manifest."""
