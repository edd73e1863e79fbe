"""Model architectures as stacks of layer ranges, loaded from GGUF files."""
