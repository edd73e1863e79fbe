"""The compute: a NumPy reference that is obviously right, and the backend interface faster paths implement."""
