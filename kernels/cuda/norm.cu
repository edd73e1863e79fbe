// RMSNorm fused with the 8-bit quantization of its output, and the plain quantization.
#include "common.cuh"

// One block per row of x [T, D]: y = x / rms(x) * weight, written as float (for the mat-mat path,
// if y is not null) and as 8-bit blocks (for the mat-vec path, if q is not null). D % 32 == 0.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_quant(const float* __restrict__ x,
                                                                const float* __restrict__ weight, int dim,
                                                                float eps, float* __restrict__ y,
                                                                block_q8_1* __restrict__ q) {
    __shared__ float partial[8];
    const float* xr = x + (long)blockIdx.x * dim;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; ++i) total += partial[i];
    const float scale = rsqrtf(total / dim + eps);
    for (int b = warp; b < dim / QK; b += warps) {  // a warp per 32-value block, a lane per value
        const int i = b * QK + lane;
        const float v = xr[i] * scale * weight[i];
        if (y) y[(long)blockIdx.x * dim + i] = v;
        if (q) quantize_lane(v, q + (long)blockIdx.x * (dim / QK) + b, lane);
    }
}

// x [T, D] float to 8-bit blocks; grid (D / 32 / 8, T), blockDim 256.
extern "C" __global__ void __launch_bounds__(256) quantize_q8_1(const float* __restrict__ x, int dim,
                                                                block_q8_1* __restrict__ q) {
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= dim / QK) return;
    const int lane = threadIdx.x & 31;
    quantize_lane(x[(long)blockIdx.y * dim + b * QK + lane], q + (long)blockIdx.y * (dim / QK) + b, lane);
}

// out[t, i] = silu(g[t, i]) * u[t, i], for the prefill path's SwiGLU after its two mat-mat products.
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out,
                                    long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = g[i] / (1.0f + __expf(-g[i])) * u[i];
}
