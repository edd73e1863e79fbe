"""A PTX emulator for the CUDA kernels' tests: they run on the CPU, under sanitizer checks, without a GPU.

compile.py gets PTX from nvcc (cached per source hash), parse.py reads it, ops.py decodes its
instructions, emulator.py runs a kernel SIMT-style over NumPy lanes, memory.py holds device memory
and the sanitizer checks, and driver.py is a fake of the pycuda calls kernels/cuda_backend.py makes.
Test infrastructure: the product never imports it.
"""
