// Seeded Gumbel-max sampling of one token per row, with temperature, in one pass over the
// vocabulary: the CUDA twin of engine/infer/sampling.py's sample_tokens for rows without
// top-k/top-p (those go to the torch twin, which sorts the vocabulary).
//
// Per row (one thread block): z = logits / temperature; token = argmax_v(z_v + g_v) with
// g_v = -log(-log(u_v)), u_v = hash(seed, step, v) exactly as mix32/stream_key/uniforms in
// sampling.py, so the kernel and the twin draw the same token (up to float rounding in
// near ties); logprob = z_tok - logsumexp(z); raw_logprob = logit_tok - logsumexp(logit).
// temperature <= 0: greedy (argmax of the logits), logprob = raw_logprob.
// No torch headers: the binding that registers it as a torch.library op lives apart.
#include <cuda_runtime.h>
#include <stdint.h>
#include <math.h>

namespace {

constexpr uint32_t kMul = 0x45D9F3Bu;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * kMul;
  x = ((x >> 16) ^ x) * kMul;
  return (x >> 16) ^ x;
}

__device__ __forceinline__ uint32_t stream_key(int64_t seed, int64_t step) {
  uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull);
  uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(seed) >> 32) & 0xFFFFFFFFull);
  uint32_t h = mix32(lo ^ mix32(hi ^ kGolden));
  return mix32(h ^ static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xFFFFFFFFull));
}

__device__ __forceinline__ float gumbel(uint32_t key, uint32_t v) {
  uint32_t h = mix32(key ^ mix32(v + kGolden));
  float u = (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return -logf(-logf(u));
}

struct Lse {  // online log-sum-exp
  float m, s;
  __device__ void add(float x) {
    if (x > m) { s = s * expf(m - x) + 1.0f; m = x; } else { s += expf(x - m); }
  }
  __device__ void merge(Lse o) {
    if (o.m == -INFINITY) return;
    if (m == -INFINITY) { *this = o; return; }
    float mm = fmaxf(m, o.m);
    s = s * expf(m - mm) + o.s * expf(o.m - mm);
    m = mm;
  }
  __device__ float value() const { return m + logf(s); }
};

__global__ void sample_rows_kernel(const float* __restrict__ logits, int64_t row_stride, int vocab,
                                   const float* __restrict__ temperature, const int64_t* __restrict__ seeds,
                                   const int64_t* __restrict__ steps, int64_t* __restrict__ tokens,
                                   float* __restrict__ logprob, float* __restrict__ raw_logprob) {
  const int row = blockIdx.x;
  const float* x = logits + static_cast<int64_t>(row) * row_stride;
  const float t = temperature[row];
  const bool greedy = !(t > 0.0f);
  const float inv_t = greedy ? 1.0f : 1.0f / t;
  const uint32_t key = stream_key(seeds[row], steps[row]);
  Lse raw{-INFINITY, 0.0f}, scaled{-INFINITY, 0.0f};
  float best = -INFINITY;
  int best_idx = 0;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float l = x[v];
    raw.add(l);
    const float z = l * inv_t;
    scaled.add(z);
    const float score = greedy ? l : z + gumbel(key, static_cast<uint32_t>(v));
    if (score > best) { best = score; best_idx = v; }
  }
  __shared__ Lse s_raw[kThreads], s_scaled[kThreads];
  __shared__ float s_best[kThreads];
  __shared__ int s_idx[kThreads];
  s_raw[threadIdx.x] = raw;
  s_scaled[threadIdx.x] = scaled;
  s_best[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_idx;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      const int o = threadIdx.x + off;
      s_raw[threadIdx.x].merge(s_raw[o]);
      s_scaled[threadIdx.x].merge(s_scaled[o]);
      // ties go to the lower index, as torch.argmax
      if (s_best[o] > s_best[threadIdx.x] || (s_best[o] == s_best[threadIdx.x] && s_idx[o] < s_idx[threadIdx.x])) {
        s_best[threadIdx.x] = s_best[o];
        s_idx[threadIdx.x] = s_idx[o];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int tok = s_idx[0];
    const float r = x[tok] - s_raw[0].value();
    tokens[row] = tok;
    raw_logprob[row] = r;
    logprob[row] = greedy ? r : x[tok] * inv_t - s_scaled[0].value();
  }
}

}  // namespace

// logits [rows, vocab] float32 (row stride row_stride, unit column stride); temperature [rows]
// float32; seeds, steps [rows] int64; outputs tokens [rows] int64, logprob/raw_logprob [rows]
// float32. All device pointers; launched on `stream`. Returns the launch error, if any.
extern "C" cudaError_t engine_sample_rows(const float* logits, int64_t row_stride, int rows, int vocab,
                                          const float* temperature, const int64_t* seeds, const int64_t* steps,
                                          int64_t* tokens, float* logprob, float* raw_logprob, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  sample_rows_kernel<<<rows, kThreads, 0, stream>>>(logits, row_stride, vocab, temperature, seeds, steps, tokens,
                                                    logprob, raw_logprob);
  return cudaGetLastError();
}
