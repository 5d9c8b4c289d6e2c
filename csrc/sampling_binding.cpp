// torch binding of csrc/sampling.cu: registers engine_C::sample_rows (CUDA dispatch key)
// and an empty Python module, so the library loads either as ``kernels._C`` (setup.py) or as
// the JIT-built extension of engine/infer/sampling_op.py (torch.utils.cpp_extension.load).
// The Python op engine::sample_tokens calls it for rows without top-k/top-p.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <limits>
#include <tuple>

extern "C" cudaError_t engine_sample_rows(const float* logits, int64_t row_stride, int rows, int vocab,
                                          const float* temperature, const int64_t* seeds, const int64_t* steps,
                                          int64_t* tokens, float* logprob, float* raw_logprob, cudaStream_t stream);

namespace {

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "engine_C::sample_rows: ", name, " is on ", t.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == rows, "engine_C::sample_rows: ", name,
              " must be ", c10::toString(dtype), " [", rows, "], got ", t.scalar_type(), " ", t.sizes());
}

// logits [B, V] float32 (unit column stride), temperature [B] float32, seeds/steps [B] int64,
// all on one CUDA device -> tokens [B] int64, logprob [B] float32, raw_logprob [B] float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_rows(const at::Tensor& logits, const at::Tensor& temperature,
                                                           const at::Tensor& seeds, const at::Tensor& steps) {
  TORCH_CHECK(logits.is_cuda(), "engine_C::sample_rows: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "engine_C::sample_rows: logits must be float32 [rows, vocab], got ", logits.scalar_type(), " ",
              logits.sizes());
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab <= std::numeric_limits<int>::max() && rows <= std::numeric_limits<int>::max(),
              "engine_C::sample_rows: vocab must be in [1, 2^31), rows below 2^31; got ", logits.sizes());
  check_rows(temperature, "temperature", at::kFloat, rows, logits);
  check_rows(seeds, "seeds", at::kLong, rows, logits);
  check_rows(steps, "steps", at::kLong, rows, logits);
  // Only a unit stride along the vocabulary is needed; the 1-D inputs are tiny.
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor temp = temperature.contiguous();
  const at::Tensor seed = seeds.contiguous();
  const at::Tensor step = steps.contiguous();

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor tokens = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor logprob = at::empty({rows}, x.options());
  at::Tensor raw_logprob = at::empty({rows}, x.options());
  if (rows == 0) {
    return std::make_tuple(tokens, logprob, raw_logprob);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = engine_sample_rows(
      x.data_ptr<float>(), x.stride(0), static_cast<int>(rows), static_cast<int>(vocab), temp.data_ptr<float>(),
      seed.data_ptr<int64_t>(), step.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), logprob.data_ptr<float>(),
      raw_logprob.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "engine_C::sample_rows: kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(tokens, logprob, raw_logprob);
}

}  // namespace

TORCH_LIBRARY(engine_C, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor seeds, Tensor steps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(engine_C, CUDA, m) {
  m.impl("sample_rows", &sample_rows);
}

// The ops are reached through torch.ops.engine_C; the module only makes the library importable.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engine CUDA kernels, registered as torch.ops.engine_C.*";
}
