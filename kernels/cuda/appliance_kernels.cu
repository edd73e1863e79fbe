// The one translation unit the fatbin is built from (kernels/cuda/build.py): every kernel source.
#include "attention.cu"
#include "embed.cu"
#include "matmat.cu"
#include "matvec.cu"
#include "norm.cu"
#include "rope.cu"
#include "sample.cu"
