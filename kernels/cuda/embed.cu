// Embedding gather: the rows of the token table that the ids ask for, dequantized to float.
#include "common.cuh"

// out [T, D] = table[ids[t], :]; grid T, blockDim 64, a thread per 32-value unit.
template <int QT>
__device__ void embed(const uint8_t* __restrict__ table, int dim, const int* __restrict__ ids, float* __restrict__ out) {
    const uint8_t* row = table + ids[blockIdx.x] * row_bytes(QT, dim);
    for (int u = threadIdx.x; u < dim / QK; u += blockDim.x) {
        float v[QK];
        dequant_unit<QT>(row, u, v);
        float4* dst = reinterpret_cast<float4*>(out + (long)blockIdx.x * dim + u * QK);
#pragma unroll
        for (int i = 0; i < QK / 4; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
}

#define EMBED_ENTRY(name, QT)                                                                               \
    extern "C" __global__ void embed_##name(const uint8_t* table, int dim, const int* ids, float* out) { \
        embed<QT>(table, dim, ids, out);                                                                   \
    }
FOR_EACH_QTYPE(EMBED_ENTRY)
EMBED_ENTRY(f32, F32)
