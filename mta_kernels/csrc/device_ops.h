// The layout ops every device implements, declared once: included inside namespace mta_kernels::cpu
// (segments.h) and mta_kernels::cuda (cuda/layout_cuda.h), so both devices have the same signatures.
// No include guard on purpose: each namespace includes it once.
void validate_layout(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens, int64_t seq_len);
at::Tensor token_to_unit(const at::Tensor& ranges, int64_t num_tokens);
at::Tensor unit_to_seq(const at::Tensor& cu_units, std::optional<int64_t> num_units);
at::Tensor offsets_from_lengths(const at::Tensor& lengths);
at::Tensor block_diagonal_work_list(const at::Tensor& cu_units, int64_t block_m);
