// The CPU kernels of bitlab::ternary_linear / int8_linear / int4_linear as C++ dispatcher kernels.
//
// A Python kernel behind torch's dispatcher costs ~11 us per call in boxing the arguments into Python objects
// and back, more than the C kernel of a decode step on a small layer; torch.compile'd graphs call the ops this
// way ~200 times per token of a small LLM. This file registers boxed C++ kernels for the CPU key instead.
// They run the common case themselves, calling the same C function the Python kernel calls (bitlab_linear of
// the library ops/cpu/__init__.py loaded, handed over by bitlab_torch_set_kernel), with the same arguments:
//   x float32 and contiguous, a contiguous weight of the right shape, weight_scale float32 [1], [N] or [N, G]
//   (G groups dividing K; ternary groups of whole 32-k runs), bias None or float32 [N], act "per_token" /
//   "per_tensor" (static multiplier: float32, one number).
// Anything else (other dtypes, other scale shapes, weight-only, integer biases, act_bits != 8, bad input that needs its error
// message, the kernel switched off by BITLAB_FX_DISABLE_CPU_KERNEL) goes to the Python kernel, kept as the op
// bitlab::_py_<name> with the same schema: the results are those of the Python kernel in every case.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

using LinearFn = int (*)(const float*, int64_t, int64_t, const void*, int, int64_t, const float*, int, int64_t,
                         const float*, int, float, float*, int);
LinearFn g_linear = nullptr;

bool kernel_disabled() {
  const char* v = std::getenv("BITLAB_FX_DISABLE_CPU_KERNEL");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

bool is_f32_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu();
}

// Stack positions (schemas in ops/_schema.py): x, weight, weight_scale, bias, act, act_scale, then
// in_features and act_multiplier for the packed formats, act_multiplier for int8; then bias_codes, act_bits and
// bias_bits (schema version 4).
template <int Wfmt>
bool run_fast(torch::jit::Stack* stack) {
  constexpr bool kPacked = Wfmt != 1;
  constexpr size_t kArgs = kPacked ? 11 : 10;
  if (g_linear == nullptr || stack->size() < kArgs || kernel_disabled()) return false;
  auto base = stack->end() - kArgs;
  const c10::IValue& xv = base[0];
  const c10::IValue& wv = base[1];
  const c10::IValue& sv = base[2];
  const c10::IValue& bv = base[3];
  if (!xv.isTensor() || !wv.isTensor() || !sv.isTensor() || !base[4].isString()) return false;
  const at::Tensor& x = xv.toTensor();
  const at::Tensor& w = wv.toTensor();
  const at::Tensor& ws = sv.toTensor();
  if (!is_f32_contiguous(x) || x.dim() < 1 || !w.is_contiguous() || w.dim() != 2 || !w.device().is_cpu()) return false;
  const int64_t k = x.size(-1);
  const int64_t n = w.size(0);
  if (k <= 0 || n <= 0) return false;
  if (Wfmt == 0 && (w.scalar_type() != at::kByte || w.size(1) * 4 != (k + 127) / 128 * 128)) return false;
  if (Wfmt == 2 && (w.scalar_type() != at::kByte || w.size(1) != (k + 1) / 2)) return false;
  if (Wfmt == 1 && (w.scalar_type() != at::kChar || w.size(1) != k)) return false;
  if (kPacked) {
    const c10::IValue& in_features = base[6];
    if (!in_features.isInt() || (in_features.toInt() >= 0 && in_features.toInt() != k)) return false;
  }
  // the scale layout, as the Python kernel passes it (cpu._scales, cpu._supported): 0 per tensor, 1 per channel,
  // 2 per group (groups of K / G; ternary ones of whole 32-k runs, else the reference runs)
  if (!is_f32_contiguous(ws)) return false;
  int kind;
  int64_t groups = 1;
  if (ws.dim() == 1 && (ws.size(0) == 1 || ws.size(0) == n)) {
    kind = (ws.size(0) == n && n > 1) ? 1 : 0;
  } else if (ws.dim() == 2 && ws.size(0) == n && ws.size(1) > 0 && k % ws.size(1) == 0 &&
             (Wfmt != 0 || (k / ws.size(1)) % 32 == 0)) {
    kind = 2;
    groups = ws.size(1);
  } else {
    return false;
  }
  const float* bias = nullptr;
  if (!bv.isNone()) {
    if (!bv.isTensor()) return false;
    const at::Tensor& b = bv.toTensor();
    if (!is_f32_contiguous(b) || b.dim() != 1 || b.size(0) != n) return false;
    bias = b.data_ptr<float>();
  }
  if (!base[kArgs - 3].isNone()) return false;  // integer bias codes: the Python kernel
  const c10::IValue& act_bits = base[kArgs - 2];
  const c10::IValue& bias_bits = base[kArgs - 1];
  if (!act_bits.isInt() || act_bits.toInt() != 8 || !bias_bits.isInt() || bias_bits.toInt() != 0) return false;
  const c10::IValue& scale_v = base[5];
  const c10::IValue& mult_v = base[kArgs - 4];
  if (!scale_v.isNone() && !mult_v.isNone()) return false;  // both names: the Python kernel raises
  const c10::IValue& static_v = scale_v.isNone() ? mult_v : scale_v;
  auto act = base[4].toStringRef();
  int code;
  float static_multiplier = 0.0f;
  if (!static_v.isNone()) {
    if (!static_v.isTensor()) return false;
    const at::Tensor& s = static_v.toTensor();
    if (!is_f32_contiguous(s) || s.numel() != 1) return false;
    if (act != "per_token" && act != "per_tensor") return false;
    code = 2;
    static_multiplier = *s.data_ptr<float>();
  } else if (act == "per_token") {
    code = 0;
  } else if (act == "per_tensor") {
    code = 1;
  } else {
    return false;  // "none" (weight-only) or a bad mode
  }
  const int64_t m = x.numel() / k;
  if (m <= 0) return false;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  int rc = g_linear(x.data_ptr<float>(), m, k, w.data_ptr(), Wfmt, n, ws.data_ptr<float>(), kind, groups, bias, code,
                    static_multiplier, out.data_ptr<float>(), at::get_num_threads());
  if (rc != 0) return false;  // out of memory: the Python kernel raises its error
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, std::move(out));
  return true;
}

template <int Wfmt>
void linear_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  if (run_fast<Wfmt>(stack)) return;
  static const char* const kFallback[] = {"bitlab::_py_ternary_linear", "bitlab::_py_int8_linear",
                                          "bitlab::_py_int4_linear"};
  static const c10::OperatorHandle fallback =
      c10::Dispatcher::singleton().findSchemaOrThrow(kFallback[Wfmt], "");
  fallback.callBoxed(stack);
}

}  // namespace

extern "C" int bitlab_torch_set_kernel(void* linear) {
  g_linear = reinterpret_cast<LinearFn>(linear);
  return 1;
}

TORCH_LIBRARY_IMPL(bitlab, CPU, m) {
  m.impl("ternary_linear", torch::CppFunction::makeFromBoxedFunction<&linear_kernel<0>>());
  m.impl("int8_linear", torch::CppFunction::makeFromBoxedFunction<&linear_kernel<1>>());
  m.impl("int4_linear", torch::CppFunction::makeFromBoxedFunction<&linear_kernel<2>>());
}
