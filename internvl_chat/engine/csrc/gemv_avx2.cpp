// internvl_chat::gemv(weight, x): y = weight · x in float32, for the compiled CPU decode step's
// one-row linears (engine/cpu_gemv.py says when and why); the kernels are in gemv_avx2.h.

#include "gemv_avx2.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

at::Tensor gemv(const at::Tensor& weight, const at::Tensor& x_in) {
  TORCH_CHECK(weight.device().is_cpu() && x_in.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be a contiguous matrix");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.numel() == weight.size(1),
              "gemv: x must be float32 with one value per weight column");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor y = at::empty({N}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    internvl_chat_cpu::gemv_f32(weight.data_ptr<float>(), N, K, x.data_ptr<float>(), y.data_ptr<float>());
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "gemv: weight must be float32 or bfloat16");
    internvl_chat_cpu::gemv_bf16(weight.data_ptr<at::BFloat16>(), N, K, x.data_ptr<float>(), y.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_chat, m) {
  m.def("gemv(Tensor weight, Tensor x) -> Tensor");
  // gemv_kernel(name): select the four-row kernels ("avx2", "avx512"; "" none), return those in use
  m.def("gemv_kernel(str name) -> str", [](std::string name) { return internvl_chat_cpu::gemv_kernel(name); });
}
TORCH_LIBRARY_IMPL(internvl_chat, CPU, m) { m.impl("gemv", &gemv); }
