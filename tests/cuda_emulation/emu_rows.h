// The launchers' host set-up around the emulated kernels, for emu.cpp: the persistent cut of
// a pretend device (plan.h), the rows and lengths of every layout (rows.h's work, through the
// same prep kernels), the rank order of the packed layout, the persistent kernels' common
// arguments. Included after the kernel headers.
#pragma once

// The persistent cut the launcher would take on a device with `sms` SMs and `smem` bytes of
// dynamic shared memory per block (max_kc: VARLEN_RNN_PERSISTENT_MAX_KC).
// mma: the tensor-core kernel's cut (its padded strides, its tile type); pad: padded_stride's
// padding (set_smem_padding in emu.cpp; off only to show the conflicts it removes).
plan::Cut cut_of(int64_t B, int64_t H, int64_t D, plan::Pass pass, int64_t sb, int64_t ab,
                 int64_t sms, int64_t smem, int64_t max_kc, int64_t gates, bool mma, bool pad) {
  plan::Problem p{B, H, D, pass, sb, ab, true};
  p.gates = gates;
  p.persistent_mma = mma;
  p.pad_smem = pad;
  const plan::Device dev{sms, smem, true, true};
  plan::Cut cut;
  std::string why;
  TORCH_CHECK(plan::persistent_cut(p, dev, max_kc, cut, why), "no persistent cut: ", why);
  return cut;
}

at::Tensor cut_tensor(const plan::Cut& c) {
  return at::tensor({c.J, c.blocks_per_dir, c.tile_rows, c.kc, c.blocks}, at::kLong);
}

struct Lens {
  std::vector<int> lens, perm, sorted;
};
Lens prep(const int64_t* lengths, int B, int T) {
  Lens l{std::vector<int>(B), std::vector<int>(B), std::vector<int>(B)};
  emu_launch_seq((B + 255) / 256, 256, [&] {
    lengths_prep_kernel<int64_t>(lengths, B, T, l.lens.data(), l.perm.data(), l.sorted.data());
  });
  return l;
}

// The launcher's rows (ops_cuda.cu: set_padded_rows / set_ragged_rows). layout: 0 offsets
// (seq_index = offsets [B+1]), 1 packed (batch_sizes [T], sorted_indices or an empty tensor),
// 2 padded (seq_index = lengths [B], bf: batch-major). T: the padded time dimension or max_len.
struct Rows {
  RowMap map;
  int64_t R = 0;
  std::vector<int64_t> starts, lengths;
  at::Tensor order;  // packed: rank -> sequence, or undefined
  Lens l;
};
Rows rows_of(int64_t layout, const at::Tensor& seq_index, const at::Tensor& sorted_indices,
             int64_t T, bool bf, int64_t B, int64_t N) {
  Rows r;
  const at::Tensor idx = seq_index.to(at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  if (layout == 2) {
    r.map = padded_map(bf, T, B, nullptr);
    r.R = T * B;
    r.lengths.assign(p, p + B);
  } else if (layout == 0) {
    r.R = N;
    r.starts.resize(B + 1);
    r.lengths.resize(B);
    emu_launch_seq((B + 256) / 256, 256, [&] {
      offsets_prep_kernel<int64_t>(p, B, N, T, r.starts.data(), r.lengths.data());
    });
    r.map = offsets_map(r.starts.data(), nullptr);
  } else {
    const int64_t steps = idx.size(0);
    r.R = N;
    r.starts.resize(steps + 1);
    r.lengths.resize(B);
    packed_rows(p, steps, B, r.starts.data(), r.lengths.data());
    r.map = packed_map(r.starts.data(), nullptr);
    if (sorted_indices.numel() > 0) {
      const at::Tensor si = sorted_indices.contiguous();
      std::vector<int> count(B, 0);
      r.order = at::empty({B}, at::kLong);
      emu_launch_seq((B + 255) / 256, 256, [&] {
        permutation_count_kernel(si.data_ptr<int64_t>(), B, count.data(),
                                 r.order.data_ptr<int64_t>());
      });
      emu_launch_seq((B + 255) / 256, 256, [&] { permutation_check_kernel(count.data(), B); });
    }
  }
  r.l = prep(r.lengths.data(), (int)B, (int)T);
  return r;
}

at::Tensor to_rank(const Rows& r, const at::Tensor& t) {
  return r.order.defined() ? t.index_select(1, r.order).contiguous() : t.contiguous();
}
at::Tensor to_sequence(const Rows& r, const at::Tensor& t) {
  return r.order.defined() ? at::empty_like(t).index_copy_(1, r.order, t) : t;
}

template <typename scalar_t, typename acc_t>
void fill_common(PersistentCommonArgs& a, const Rows& r, const plan::Cut& cut, int64_t T, int64_t B,
                 int64_t H, int64_t D) {
  a.lens = r.l.lens.data();
  a.perm = r.l.perm.data();
  a.sorted = r.l.sorted.data();
  a.rows = r.map;
  a.R = r.R;
  a.T = T;
  a.B = B;
  a.H = H;
  a.D = D;
  a.ps = PersistentShape{(int)cut.J,  (int)cut.blocks_per_dir, (int)cut.tile_rows,
                        (int)cut.kc, (int)cut.kc_stride,      (int)cut.w_stride};
}
