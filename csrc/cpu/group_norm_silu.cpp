// GroupNorm + SiLU on the CPU, with the averaging skip and the per-(batch, channel) bias fused
// in (the formulas are in patchddm_fast/ops/schemas.def and the Python op's reference).
//
// Layout: x is (B, C, S) contiguous, so channel (b, c) is one run of S elements and a group
// is Cg = C / G consecutive channels. Every pass splits each channel into chunks of at most
// kChunk elements, the (channel, chunk) units. When the (batch, group) pairs share out evenly
// over the threads, each thread runs whole groups, both passes one group after the other
// (the second pass then reads a group still in cache); otherwise each pass runs the units in
// parallel, so a batch of one 256^3 volume with 8 groups still spreads over every thread
// (run_passes). Both give the same bits. Indices are int64 throughout.
//
// Forward: pass 1 computes per-chunk sums of (a - shift) and (a - shift)^2, where a is x or
// the rounded average (written here) and shift is the channel's first value, so that a large
// mean does not cancel the variance away; the sums are float lanes within a tile and double
// across tiles. Channel statistics then combine per group (adding `add`, a per-channel
// constant, moves only the channel mean). Pass 2 writes y = silu(a * A[b,c] + B[b,c]).
// Backward: pass 1 recomputes z from a and the saved mean/rstd and reduces dz = dy * silu'(z)
// and dz * xhat per chunk (float and double keep dz in grad_input's buffer); pass 2 writes
// grad_input from those group sums.
//
// Channels last (x channels_last / channels_last_3d, (B, S, C) in memory: what the trainer feeds
// CPUs, and how ATen's GroupNorm computes it natively): the same formulas, computed in place
// with no layout copies; skip and the gradients must lie as x (the Python op and the autograd
// make them so). A channel is then strided, so the loops run over whole rows, channel
// innermost, with the per-channel constants repeated in a pattern of rows that fills whole
// vectors (RowChunks); statistics come from per-(batch, chunk of rows, channel) sums. Both
// passes run over the chunks in parallel (forward_channels_last_impl, backward_...).
//
// group_norm_silu_stats: pass 1 and the group statistics alone, the same code as the forward's
// (ContiguousStats, ChannelsLastStats), so the same bits.
//
// group_norm_silu_apply: pass 2 alone, with the caller's statistics (of a whole tensor, applied
// to a depth slab of it), over the same spans, read from x and written to out at their own
// batch (and channel) strides, so slabs of either layout need no copies (apply_impl).
//
// The element loops (group_norm_silu_loops.h) are plain loops that GCC vectorises, compiled for
// AVX-512, AVX2 and baseline x86-64; each call runs the copy that cpu_isa() chose (vec.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../group_norm_silu_args.h"
#include "vec.h"

namespace patchddm {
namespace {

constexpr int64_t kChunk = 32768;  // elements of one channel per parallel unit
constexpr int64_t kTile = 1024;    // elements summed in the arithmetic type before a double add
constexpr int64_t kGrain = 32768;  // elements per task at least: amortises the fork
// Largest group whose dz the half-precision backward keeps in a float buffer per thread
// (1 MiB: one group of the paper's levels, 4 channels of 16^3 to 1 of 64^3, in L2).
constexpr int64_t kScratchElements = 262144;

using cpu::Elem;  // storage <-> arithmetic conversion of each dtype
using cpu::bits_float, cpu::float_bits, cpu::select_bits;  // the loops' branch-free selects

// -- the element loops, once per instruction set ------------------------------------------

// Float and double store their arithmetic values, so the backward can keep dz in grad_input's
// buffer between its passes instead of computing the sigmoid twice.
template <typename T>
constexpr bool kKeepsDz = std::is_same_v<typename Elem<T>::storage, typename Elem<T>::acc>;

#define PATCHDDM_LOOPS "group_norm_silu_loops.h"
#include "per_isa.h"

// -- work split ---------------------------------------------------------------------------------

// (channel, chunk) units over B * C channels of S elements each.
struct Units {
  int64_t channels, spatial, chunk, per_channel;
  Units(int64_t bc, int64_t s)
      : channels(bc), spatial(s), chunk(std::max<int64_t>(1, std::min(s, kChunk))),
        per_channel(s == 0 ? 0 : (s + chunk - 1) / chunk) {}
  int64_t count() const { return channels * per_channel; }
  int64_t grain() const { return std::max<int64_t>(1, kGrain / chunk); }
  // Calls f(unit, channel, offset of the span in the tensor, span length) for units [begin, end).
  template <typename F>
  void for_each(int64_t begin, int64_t end, F&& f) const {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bc = u / per_channel, start = (u % per_channel) * chunk;
      f(u, bc, bc * spatial + start, std::min(chunk, spatial - start));
    }
  }
};

// Channels last: each batch entry is S rows of C channels, split into chunks of whole rows,
// the (batch, chunk) units (every thread gets a share of a batch of one). A chunk holds whole
// patterns of `period` elements (k rows, k = 16 / gcd(C, 16): a multiple of 16 elements, the
// vector width of float on AVX-512), about kChunk elements, at most 1024 patterns so that each
// float accumulator of a pattern position sums at most 1024 elements before the double fold.
// The split depends on the shape only, not on the threads: the same bits on any number.
struct RowChunks {
  int64_t batch, rows, channels, period, chunk_rows, per_batch;
  RowChunks(int64_t b, int64_t s, int64_t c) : batch(b), rows(s), channels(c) {
    int64_t k = 16 / std::gcd<int64_t>(c, 16);
    if (c * k > 8192) k = 1;  // many odd channels: a pattern of one row is long enough
    period = c * k;
    chunk_rows = k * std::clamp<int64_t>(kChunk / period, 1, 1024);
    per_batch = s == 0 ? 0 : (s + chunk_rows - 1) / chunk_rows;
  }
  int64_t count() const { return batch * per_batch; }
  // Calls f(unit, batch index, offset of the chunk in the tensor, its length in elements).
  template <typename F>
  void for_each(int64_t begin, int64_t end, F&& f) const {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / per_batch, row = (u % per_batch) * chunk_rows;
      f(u, b, (b * rows + row) * channels, std::min(chunk_rows, rows - row) * channels);
    }
  }
  // Runs f over every unit in parallel, one unit per task at least (a unit is ~kChunk elements).
  template <typename F>
  void parallel(F&& f) const {
    at::parallel_for(0, count(), std::max<int64_t>(1, kGrain / (chunk_rows * channels)),
                     [&](int64_t begin, int64_t end) { for_each(begin, end, f); });
  }
  // values (B * C, per (batch, channel)) repeated over the pattern: (B, period).
  template <typename A>
  std::vector<A> pattern(const std::vector<A>& values) const {
    std::vector<A> out(batch * period);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < period; ++j) out[b * period + j] = values[b * channels + j % channels];
    return out;
  }
};

// Runs pass 1 (stats(unit, ...) over every unit), finish(group) for every (batch, group), then
// pass 2 (apply(unit, ...) over every unit); finish(g) reads only the pass-1 results of g's
// units, and apply only finish's results for its own group. Two schedules, the same
// arithmetic (so the same bits):
//  - by group: one task per (batch, group) runs its units' pass 1, its finish and its pass 2,
//    so pass 2 reads the group while it is still in cache and there is one fork per call; used
//    when the groups share out evenly over the threads (29 groups on 1 or 2 threads, say);
//  - by unit: pass 1 over all units in parallel, every finish, pass 2 in parallel; the
//    chunks split each channel, so few large groups (a batch of one with 8 groups on 16
//    threads) still use every thread.
// Whether run_passes goes by group: when the busiest thread has at most ~15% more than an
// even share of the groups.
bool by_group(int64_t groups) {
  const int64_t threads = at::get_num_threads();
  const int64_t rounds = (groups + threads - 1) / threads;  // groups per thread, at most
  return threads <= 1 || (groups > 0 && groups * 100 >= rounds * threads * 85);
}

// start(), when given, runs once per task of the by-group schedule before its first group;
// apply = nullptr skips pass 2 (group_norm_silu_stats).
template <typename Stats, typename Finish, typename Apply, typename Start = std::nullptr_t>
void run_passes(const Units& units, int64_t groups, int64_t per_group, Stats&& stats, Finish&& finish,
                Apply&& apply, Start&& start = nullptr) {
  constexpr bool kHasApply = !std::is_same_v<std::decay_t<Apply>, std::nullptr_t>;
  const int64_t group_units = per_group * units.per_channel;
  const int64_t group_elements = per_group * units.spatial;
  if (by_group(groups)) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, group_elements));
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      if constexpr (!std::is_same_v<std::decay_t<Start>, std::nullptr_t>) start();
      for (int64_t g = begin; g < end; ++g) {
        units.for_each(g * group_units, (g + 1) * group_units, stats);
        finish(g);
        if constexpr (kHasApply) units.for_each(g * group_units, (g + 1) * group_units, apply);
      }
    });
    return;
  }
  at::parallel_for(0, units.count(), units.grain(), [&](int64_t begin, int64_t end) {
    units.for_each(begin, end, stats);
  });
  for (int64_t g = 0; g < groups; ++g) finish(g);
  if constexpr (kHasApply) {
    at::parallel_for(0, units.count(), units.grain(), [&](int64_t begin, int64_t end) {
      units.for_each(begin, end, apply);
    });
  }
}

template <typename T>
auto storage_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Elem<T>::storage*>(t.const_data_ptr<T>());
}
template <typename T>
auto mutable_storage_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Elem<T>::storage*>(t.mutable_data_ptr<T>());
}

// The affine parameters and the bias in the arithmetic type (a few values per channel).
template <typename A>
std::vector<A> values_or(const std::optional<at::Tensor>& t, int64_t n, A fill) {
  if (!t.has_value()) return std::vector<A>(n, fill);
  at::Tensor c = t->to(c10::CppTypeToScalarType<A>::value).contiguous();
  const A* p = c.const_data_ptr<A>();
  return std::vector<A>(p, p + n);
}

// The constants of y = silu(a * scale + shift) for the channels of group bg (a (batch, group)
// index) from its stored statistics: scale = rstd w, shift = (add - mean) scale + bias, in
// double from the float32 (float64) mean and rstd. The forward and group_norm_silu_apply both
// compute them here, so apply given the forward's statistics gives the forward's bits.
template <typename A>
void group_constants(int64_t bg, int64_t channels, int64_t per_group, const A* mean, const A* rstd,
                     const std::vector<double>& add, const std::vector<A>& w, const std::vector<A>& b, A* scale,
                     A* shift) {
  const double m = static_cast<double>(mean[bg]), r = static_cast<double>(rstd[bg]);
  for (int64_t bc = bg * per_group; bc < (bg + 1) * per_group; ++bc) {
    const int64_t c = bc % channels;
    const double k = r * w[c];
    scale[bc] = static_cast<A>(k);
    shift[bc] = static_cast<A>((add[bc] - m) * k + b[c]);
  }
}

// -- forward statistics (pass 1 and the per-group finish) -----------------------------------------

// One channel's moments from its shifted sums s = sum(a - shift), q = sum((a - shift)^2) over
// its S elements: the mean of a + add (adding a per-channel constant moves only the mean) and M2.
inline void channel_moments(double s, double q, int64_t S, double shift, double add, double& mean, double& m2) {
  const double m = S > 0 ? s / S : 0.0;
  mean = shift + m + add;
  m2 = std::max(0.0, q - s * m);
}

// The statistics of group bg (a (batch, group) index) from its channels' moments, combined
// (Chan et al.): M2 = sum M2_c + S sum (mean_c - mean)^2; stored rounded to the arithmetic type.
template <typename A>
void group_statistics(int64_t bg, int64_t Cg, int64_t S, const double* ch_mean, const double* ch_m2, double eps,
                      A* mean, A* rstd) {
  const int64_t c0 = bg * Cg;  // first (b, c) index of the group
  double m = 0;
  for (int64_t c = 0; c < Cg; ++c) m += ch_mean[c0 + c];
  m /= Cg;
  double m2 = 0;
  for (int64_t c = 0; c < Cg; ++c) {
    const double dm = ch_mean[c0 + c] - m;
    m2 += ch_m2[c0 + c] + S * dm * dm;
  }
  const double n_group = static_cast<double>(Cg * S);
  const double var = n_group > 0 ? m2 / n_group : 0.0;
  mean[bg] = static_cast<A>(m);
  rstd[bg] = static_cast<A>(1.0 / std::sqrt(var + eps));
}

// What both layouts' statistics passes read and write: x (and skip, averaged into `average`
// when given), the per-channel add, mean and rstd; and each channel's shift, its first value
// (or first rounded average), subtracted before summing so that a large mean does not cancel
// the variance away. first(bc) is the index of channel bc's first element.
template <typename T>
class StatsPass {
 public:
  using E = Elem<T>;
  using acc = typename E::acc;

 protected:
  template <typename First>
  StatsPass(const at::Tensor& x, const std::optional<at::Tensor>& skip, at::Tensor& average,
            const std::vector<double>& add, const GroupNormDims& d, double eps, at::Tensor& mean, at::Tensor& rstd,
            First&& first)
      : choice_(cpu::cpu_isa()), d_(d), eps_(eps), xp_(storage_ptr<T>(x)),
        sp_(skip.has_value() ? storage_ptr<T>(*skip) : nullptr),
        ap_(skip.has_value() ? mutable_storage_ptr<T>(average) : nullptr), add_(add),
        mean_(mean.mutable_data_ptr<acc>()), rstd_(rstd.mutable_data_ptr<acc>()),
        shift_(d.batch * d.channels, acc(0)) {
    for (int64_t bc = 0; bc < d.batch * d.channels && d.spatial > 0; ++bc) {
      const int64_t i = first(bc);
      shift_[bc] = sp_ ? E::load(E::store((E::load(xp_[i]) + E::load(sp_[i])) * acc(0.5))) : E::load(xp_[i]);
    }
  }

  // Channel bc's moments from its sums (channel_moments).
  void channel(int64_t bc, double s, double q, double& mean, double& m2) const {
    channel_moments(s, q, d_.spatial, static_cast<double>(shift_[bc]), add_[bc], mean, m2);
  }

  const cpu::Isa choice_;  // chosen on the calling thread: it may warn once
  const GroupNormDims d_;
  const double eps_;
  const typename E::storage* xp_;
  const typename E::storage* sp_;
  typename E::storage* ap_;
  const std::vector<double>& add_;
  acc* mean_;
  acc* rstd_;
  std::vector<acc> shift_;
};

// Pass 1 of the forward on a contiguous x (writing the average when there is a skip) and the
// group statistics, as the forward and group_norm_silu_stats both run them: per (channel,
// chunk) unit, sums of (a - shift) and (a - shift)^2 (float lanes within a tile, double across
// tiles). unit() and finish() are run_passes' pass 1 and finish; finish(bg) writes mean[bg]
// and rstd[bg].
template <typename T>
class ContiguousStats : StatsPass<T> {
  using Base = StatsPass<T>;

 public:
  using typename Base::acc;
  const Units units;

  ContiguousStats(const at::Tensor& x, const std::optional<at::Tensor>& skip, at::Tensor& average,
                  const std::vector<double>& add, const GroupNormDims& d, double eps, at::Tensor& mean,
                  at::Tensor& rstd)
      : Base(x, skip, average, add, d, eps, mean, rstd, [&](int64_t bc) { return bc * d.spatial; }),
        units(d.batch * d.channels, d.spatial), sums_(units.count() * 2), ch_mean_(units.channels),
        ch_m2_(units.channels) {}

  void unit(int64_t u, int64_t bc, int64_t offset, int64_t len) {
    const auto *xp = this->xp_, *sp = this->sp_;
    auto* ap = this->ap_;
    PATCHDDM_DISPATCH_ISA(this->choice_, isa::stats_span<T>(xp + offset, sp ? sp + offset : nullptr,
                                                            ap ? ap + offset : nullptr, len, this->shift_[bc],
                                                            &sums_[u * 2]));
  }

  void finish(int64_t bg) {
    const int64_t per = units.per_channel, Cg = this->d_.per_group();
    for (int64_t bc = bg * Cg; bc < (bg + 1) * Cg; ++bc) {
      double s = 0, q = 0;
      for (int64_t k = 0; k < per; ++k) {
        s += sums_[(bc * per + k) * 2];
        q += sums_[(bc * per + k) * 2 + 1];
      }
      this->channel(bc, s, q, ch_mean_[bc], ch_m2_[bc]);
    }
    group_statistics(bg, Cg, this->d_.spatial, ch_mean_.data(), ch_m2_.data(), this->eps_, this->mean_, this->rstd_);
  }

 private:
  std::vector<double> sums_, ch_mean_, ch_m2_;
};

// The same on a channels-last x: sums per (batch, chunk of rows, channel), pass 1 over every
// chunk in parallel, then every group's statistics (run).
template <typename T>
class ChannelsLastStats : StatsPass<T> {
  using Base = StatsPass<T>;

 public:
  using typename Base::acc;
  const RowChunks units;

  // A channel's first value: voxel 0 of its batch entry.
  ChannelsLastStats(const at::Tensor& x, const std::optional<at::Tensor>& skip, at::Tensor& average,
                    const std::vector<double>& add, const GroupNormDims& d, double eps, at::Tensor& mean,
                    at::Tensor& rstd)
      : Base(x, skip, average, add, d, eps, mean, rstd,
             [&](int64_t bc) { return (bc / d.channels) * d.spatial * d.channels + bc % d.channels; }),
        units(d.batch, d.spatial, d.channels) {}

  // Pass 1 and the statistics of every group.
  void run() {
    const GroupNormDims& d = this->d_;
    const auto *xp = this->xp_, *sp = this->sp_;
    auto* ap = this->ap_;
    const int64_t C = d.channels, S = d.spatial, P = units.period, bc_count = d.batch * C;
    const std::vector<acc> shift_p = units.pattern(this->shift_);
    std::vector<double> sums(units.count() * C * 2, 0.0);  // (unit, channel, {sum, sum of squares})
    units.parallel([&](int64_t u, int64_t bi, int64_t offset, int64_t len) {
      std::vector<acc> accs(2 * P, acc(0));  // per unit of ~kChunk elements: the allocation is noise
      PATCHDDM_DISPATCH_ISA(this->choice_, isa::cl_stats_span<T>(xp + offset, sp ? sp + offset : nullptr,
                                                                 ap ? ap + offset : nullptr, len, P,
                                                                 &shift_p[bi * P], accs.data(), accs.data() + P));
      double* out = &sums[u * C * 2];
      for (int64_t j = 0; j < P; ++j) {
        out[(j % C) * 2] += accs[j];
        out[(j % C) * 2 + 1] += accs[P + j];
      }
    });
    std::vector<double> ch_mean(bc_count), ch_m2(bc_count);
    for (int64_t bc = 0; bc < bc_count; ++bc) {
      const int64_t bi = bc / C, c = bc % C;
      double s = 0, q = 0;
      for (int64_t k = 0; k < units.per_batch; ++k) {
        s += sums[((bi * units.per_batch + k) * C + c) * 2];
        q += sums[((bi * units.per_batch + k) * C + c) * 2 + 1];
      }
      this->channel(bc, s, q, ch_mean[bc], ch_m2[bc]);
    }
    for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
      group_statistics(bg, d.per_group(), S, ch_mean.data(), ch_m2.data(), this->eps_, this->mean_, this->rstd_);
    }
  }
};

// -- forward ----------------------------------------------------------------------------------

// Pass 1 and the group statistics (ContiguousStats); then per group the constants of
// y = silu(a * A + B), A = rstd w, B = (add - mean) A + bias, from the stored statistics
// (group_constants); pass 2 applies them. run_passes interleaves the three.
template <typename T>
void forward_impl(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                  const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const GroupNormDims& d, double eps, at::Tensor& y,
                  at::Tensor& average, at::Tensor& mean, at::Tensor& rstd) {
  using acc = typename Elem<T>::acc;
  const int64_t bc_count = d.batch * d.channels, Cg = d.per_group();
  const std::vector<double> add_v = values_or<double>(add, bc_count, 0.0);
  const std::vector<acc> w = values_or<acc>(weight, d.channels, acc(1));
  const std::vector<acc> b = values_or<acc>(bias, d.channels, acc(0));
  ContiguousStats<T> stats(x, skip, average, add_v, d, eps, mean, rstd);
  const cpu::Isa choice = cpu::cpu_isa();
  const auto* a_read = skip.has_value() ? storage_ptr<T>(average) : storage_ptr<T>(x);  // what pass 2 normalises
  auto* yp = mutable_storage_ptr<T>(y);
  std::vector<acc> scale(bc_count), offset_v(bc_count);
  auto stats_unit = [&](int64_t u, int64_t bc, int64_t offset, int64_t len) { stats.unit(u, bc, offset, len); };
  auto finish_group = [&](int64_t bg) {
    stats.finish(bg);
    group_constants(bg, d.channels, Cg, mean.const_data_ptr<acc>(), rstd.const_data_ptr<acc>(), add_v, w, b,
                    scale.data(), offset_v.data());
  };
  auto apply_unit = [&](int64_t, int64_t bc, int64_t offset, int64_t len) {
    PATCHDDM_DISPATCH_ISA(choice, isa::apply_span<T>(a_read + offset, yp + offset, len, scale[bc], offset_v[bc]));
  };
  run_passes(stats.units, d.batch * d.groups, Cg, stats_unit, finish_group, apply_unit);
}

// The forward on channels-last tensors: the statistics (ChannelsLastStats), the constants,
// then pass 2 over every chunk in parallel.
template <typename T>
void forward_channels_last_impl(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                                const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const GroupNormDims& d, double eps,
                                at::Tensor& y, at::Tensor& average, at::Tensor& mean, at::Tensor& rstd) {
  using acc = typename Elem<T>::acc;
  const int64_t C = d.channels, bc_count = d.batch * C;
  const std::vector<double> add_v = values_or<double>(add, bc_count, 0.0);
  const std::vector<acc> w = values_or<acc>(weight, C, acc(1));
  const std::vector<acc> b = values_or<acc>(bias, C, acc(0));
  ChannelsLastStats<T> stats(x, skip, average, add_v, d, eps, mean, rstd);
  stats.run();
  std::vector<acc> scale(bc_count), offset_v(bc_count);
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    group_constants(bg, C, d.per_group(), mean.const_data_ptr<acc>(), rstd.const_data_ptr<acc>(), add_v, w, b,
                    scale.data(), offset_v.data());
  }

  const cpu::Isa choice = cpu::cpu_isa();
  const RowChunks& units = stats.units;
  const int64_t P = units.period;
  const std::vector<acc> scale_p = units.pattern(scale), offset_p = units.pattern(offset_v);
  const auto* a_read = skip.has_value() ? storage_ptr<T>(average) : storage_ptr<T>(x);
  auto* yp = mutable_storage_ptr<T>(y);
  units.parallel([&](int64_t, int64_t bi, int64_t offset, int64_t len) {
    PATCHDDM_DISPATCH_ISA(choice, isa::cl_apply_span<T>(a_read + offset, yp + offset, len, P, &scale_p[bi * P],
                                                        &offset_p[bi * P]));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t groups,
    double eps) {
  const GroupNormDims d =
      check_group_norm_silu_forward("patchddm::group_norm_silu_forward", x, skip, add, weight, bias, groups, eps,
                                    /*channels_last=*/true);
  at::Tensor y, average, mean, rstd;
  std::tie(y, average, mean, rstd) = group_norm_silu_forward_outputs(x, skip.has_value(), d, eps);
  if (x.numel() == 0) return {y, average, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_forward_cpu", [&] {
    if (d.channels_last()) {
      forward_channels_last_impl<scalar_t>(x, skip, add, weight, bias, d, eps, y, average, mean, rstd);
    } else {
      forward_impl<scalar_t>(x, skip, add, weight, bias, d, eps, y, average, mean, rstd);
    }
  });
  return {y, average, mean, rstd};
}

// -- backward ---------------------------------------------------------------------------------

template <typename T>
void backward_impl(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_average,
                   const at::Tensor& input, const std::optional<at::Tensor>& add,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& mean, const at::Tensor& rstd, const GroupNormDims& d, double input_scale,
                   at::Tensor& grad_input, at::Tensor& grad_add, at::Tensor& grad_weight,
                   at::Tensor& grad_bias) {
  using E = Elem<T>;
  using acc = typename E::acc;
  const cpu::Isa choice = cpu::cpu_isa();
  const int64_t bc_count = d.batch * d.channels, S = d.spatial, Cg = d.per_group();
  const auto* dyp = storage_ptr<T>(grad_out);
  const auto* ap = storage_ptr<T>(input);
  const auto* gap = grad_average.has_value() ? storage_ptr<T>(*grad_average) : nullptr;
  const std::vector<double> add_v = values_or<double>(add, bc_count, 0.0);
  const std::vector<acc> w = values_or<acc>(weight, d.channels, acc(1));
  const std::vector<acc> b = values_or<acc>(bias, d.channels, acc(0));
  const auto* mean_p = mean.const_data_ptr<acc>();
  const auto* rstd_p = rstd.const_data_ptr<acc>();

  // xhat = a * rstd + q[b, c], q = (add - mean) * rstd, as in the forward.
  std::vector<acc> q(bc_count);
  for (int64_t bc = 0; bc < bc_count; ++bc) {
    const int64_t bg = bc / Cg;
    q[bc] = static_cast<acc>((add_v[bc] - static_cast<double>(mean_p[bg])) * static_cast<double>(rstd_p[bg]));
  }

  // Pass 1: per-unit sums of dz, dz * xhat and xhat; dz kept in grad_input where it fits, or
  // else, going by group, in a float buffer of one group per task (from cache in pass 2,
  // instead of computing the sigmoid again).
  auto* gip = mutable_storage_ptr<T>(grad_input);
  acc* kept = kKeepsDz<T> ? reinterpret_cast<acc*>(gip) : nullptr;
  const Units units(bc_count, S);
  const int64_t group_elements = Cg * S;
  const bool scratch = !kKeepsDz<T> && by_group(d.batch * d.groups) && group_elements <= kScratchElements;
  std::vector<double> sums(units.count() * 3);
  // The buffer of the thread's task (set by the task's start below, read by the lambdas on the
  // same thread); kept by the thread between calls, at most kScratchElements floats.
  thread_local std::vector<acc> dz_buffer;
  thread_local acc* task_dz = nullptr;
  auto stats_unit = [&](int64_t u, int64_t bc, int64_t offset, int64_t len) {
    const int64_t c = bc % d.channels;
    if (scratch) {
      PATCHDDM_DISPATCH_ISA(choice, isa::grad_stats_span<T, true>(
                                        dyp + offset, ap + offset, task_dz + offset % group_elements, len,
                                        rstd_p[bc / Cg], q[bc], w[c], b[c], &sums[u * 3]));
    } else {
      PATCHDDM_DISPATCH_ISA(choice, isa::grad_stats_span<T, kKeepsDz<T>>(
                                        dyp + offset, ap + offset, kKeepsDz<T> ? kept + offset : nullptr, len,
                                        rstd_p[bc / Cg], q[bc], w[c], b[c], &sums[u * 3]));
    }
  };

  // du = rstd (w dz - m1 - xhat m2), m1 = mean over the group of w dz, m2 of w dz xhat.
  std::vector<double> s_dz(bc_count, 0.0), s_dzx(bc_count, 0.0), s_x(bc_count, 0.0);
  const double n_group = static_cast<double>(Cg * S);
  std::vector<acc> c1(bc_count), c2(bc_count), c3(bc_count);
  auto* gadd = add.has_value() ? grad_add.mutable_data_ptr<acc>() : nullptr;
  auto finish_group = [&](int64_t bg) {
    double m1 = 0, m2 = 0;
    for (int64_t bc = bg * Cg; bc < (bg + 1) * Cg; ++bc) {
      for (int64_t k = 0; k < units.per_channel; ++k) {
        const double* s = &sums[(bc * units.per_channel + k) * 3];
        s_dz[bc] += s[0];
        s_dzx[bc] += s[1];
        s_x[bc] += s[2];
      }
      const int64_t c = bc % d.channels;
      m1 += static_cast<double>(w[c]) * s_dz[bc];
      m2 += static_cast<double>(w[c]) * s_dzx[bc];
    }
    m1 = n_group > 0 ? m1 / n_group : 0.0;
    m2 = n_group > 0 ? m2 / n_group : 0.0;
    const double r = static_cast<double>(rstd_p[bg]);
    for (int64_t bc = bg * Cg; bc < (bg + 1) * Cg; ++bc) {
      const double k1 = r * w[bc % d.channels], k2 = -r * m2, k3 = -r * m1;
      c1[bc] = static_cast<acc>(k1);
      c2[bc] = static_cast<acc>(k2);
      c3[bc] = static_cast<acc>(k3);
      if (gadd != nullptr) gadd[bc] = static_cast<acc>(k1 * s_dz[bc] + k2 * s_x[bc] + k3 * S);
    }
  };

  // Pass 2: grad_input.
  const acc scale_in = static_cast<acc>(input_scale);
  auto apply_unit = [&](int64_t, int64_t bc, int64_t offset, int64_t len) {
    const int64_t c = bc % d.channels;
    if constexpr (kKeepsDz<T>) {
      PATCHDDM_DISPATCH_ISA(choice, isa::grad_apply_kept_span<T>(ap + offset, gap ? gap + offset : nullptr,
                                                                 kept + offset, len, rstd_p[bc / Cg], q[bc],
                                                                 c1[bc], c2[bc], c3[bc], scale_in));
    } else {
      if (scratch) {
        PATCHDDM_DISPATCH_ISA(choice, isa::grad_apply_dz_span<T>(ap + offset, gap ? gap + offset : nullptr,
                                                                 task_dz + offset % group_elements, gip + offset,
                                                                 len, rstd_p[bc / Cg], q[bc], c1[bc], c2[bc],
                                                                 c3[bc], scale_in));
      } else {
        PATCHDDM_DISPATCH_ISA(choice, isa::grad_apply_span<T>(dyp + offset, ap + offset, gap ? gap + offset : nullptr,
                                                              gip + offset, len, rstd_p[bc / Cg], q[bc], w[c], b[c],
                                                              c1[bc], c2[bc], c3[bc], scale_in));
      }
    }
  };
  if (scratch) {
    run_passes(units, d.batch * d.groups, Cg, stats_unit, finish_group, apply_unit, [&] {
      if (dz_buffer.size() < static_cast<size_t>(group_elements)) dz_buffer.resize(group_elements);
      task_dz = dz_buffer.data();
    });
  } else {
    run_passes(units, d.batch * d.groups, Cg, stats_unit, finish_group, apply_unit);
  }

  if (weight.has_value() || bias.has_value()) {
    auto* gw = weight.has_value() ? grad_weight.mutable_data_ptr<acc>() : nullptr;
    auto* gb = bias.has_value() ? grad_bias.mutable_data_ptr<acc>() : nullptr;
    for (int64_t c = 0; c < d.channels; ++c) {
      double sw = 0, sb = 0;
      for (int64_t bi = 0; bi < d.batch; ++bi) {
        sw += s_dzx[bi * d.channels + c];
        sb += s_dz[bi * d.channels + c];
      }
      if (gw != nullptr) gw[c] = static_cast<acc>(sw);
      if (gb != nullptr) gb[c] = static_cast<acc>(sb);
    }
  }
}

// The backward on channels-last tensors: per-(batch, chunk, channel) sums of dz, dz * xhat and
// xhat (float and double keep dz in grad_input's buffer; half-precision types compute it again
// in pass 2), the group constants, then grad_input, each pass over every chunk in parallel.
template <typename T>
void backward_channels_last_impl(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_average,
                                 const at::Tensor& input, const std::optional<at::Tensor>& add,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& mean, const at::Tensor& rstd, const GroupNormDims& d,
                                 double input_scale, at::Tensor& grad_input, at::Tensor& grad_add,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using E = Elem<T>;
  using acc = typename E::acc;
  const cpu::Isa choice = cpu::cpu_isa();
  const int64_t C = d.channels, S = d.spatial, Cg = d.per_group(), bc_count = d.batch * C;
  const auto* dyp = storage_ptr<T>(grad_out);
  const auto* ap = storage_ptr<T>(input);
  const auto* gap = grad_average.has_value() ? storage_ptr<T>(*grad_average) : nullptr;
  const std::vector<double> add_v = values_or<double>(add, bc_count, 0.0);
  const std::vector<acc> w = values_or<acc>(weight, C, acc(1));
  const std::vector<acc> b = values_or<acc>(bias, C, acc(0));
  const auto* mean_p = mean.const_data_ptr<acc>();
  const auto* rstd_p = rstd.const_data_ptr<acc>();

  std::vector<acc> q(bc_count), r(bc_count), wb(bc_count), bb(bc_count);
  for (int64_t bc = 0; bc < bc_count; ++bc) {
    const int64_t bg = bc / Cg;
    q[bc] = static_cast<acc>((add_v[bc] - static_cast<double>(mean_p[bg])) * static_cast<double>(rstd_p[bg]));
    r[bc] = rstd_p[bg];
    wb[bc] = w[bc % C];
    bb[bc] = b[bc % C];
  }
  const RowChunks units(d.batch, S, C);
  const int64_t P = units.period;
  const std::vector<acc> q_p = units.pattern(q), r_p = units.pattern(r), w_p = units.pattern(wb),
                         b_p = units.pattern(bb);

  auto* gip = mutable_storage_ptr<T>(grad_input);
  acc* kept = kKeepsDz<T> ? reinterpret_cast<acc*>(gip) : nullptr;
  std::vector<double> sums(units.count() * C * 3, 0.0);  // (unit, channel, {dz, dz xhat, xhat})
  units.parallel([&](int64_t u, int64_t bi, int64_t offset, int64_t len) {
    std::vector<acc> accs(3 * P, acc(0));
    const int64_t o = bi * P;
    PATCHDDM_DISPATCH_ISA(choice, isa::cl_grad_stats_span<T, kKeepsDz<T>>(
                                      dyp + offset, ap + offset, kKeepsDz<T> ? kept + offset : nullptr, len, P,
                                      &r_p[o], &q_p[o], &w_p[o], &b_p[o], accs.data(), accs.data() + P,
                                      accs.data() + 2 * P));
    double* out = &sums[u * C * 3];
    for (int64_t j = 0; j < P; ++j) {
      for (int64_t k = 0; k < 3; ++k) out[(j % C) * 3 + k] += accs[k * P + j];
    }
  });

  // du = rstd (w dz - m1 - xhat m2), m1 = mean over the group of w dz, m2 of w dz xhat.
  std::vector<double> s_dz(bc_count, 0.0), s_dzx(bc_count, 0.0), s_x(bc_count, 0.0);
  for (int64_t bc = 0; bc < bc_count; ++bc) {
    const int64_t bi = bc / C, c = bc % C;
    for (int64_t k = 0; k < units.per_batch; ++k) {
      const double* s = &sums[((bi * units.per_batch + k) * C + c) * 3];
      s_dz[bc] += s[0];
      s_dzx[bc] += s[1];
      s_x[bc] += s[2];
    }
  }
  const double n_group = static_cast<double>(Cg * S);
  std::vector<acc> c1(bc_count), c2(bc_count), c3(bc_count);
  auto* gadd = add.has_value() ? grad_add.mutable_data_ptr<acc>() : nullptr;
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    double m1 = 0, m2 = 0;
    for (int64_t bc = bg * Cg; bc < (bg + 1) * Cg; ++bc) {
      m1 += static_cast<double>(w[bc % C]) * s_dz[bc];
      m2 += static_cast<double>(w[bc % C]) * s_dzx[bc];
    }
    m1 = n_group > 0 ? m1 / n_group : 0.0;
    m2 = n_group > 0 ? m2 / n_group : 0.0;
    const double rs = static_cast<double>(rstd_p[bg]);
    for (int64_t bc = bg * Cg; bc < (bg + 1) * Cg; ++bc) {
      const double k1 = rs * w[bc % C], k2 = -rs * m2, k3 = -rs * m1;
      c1[bc] = static_cast<acc>(k1);
      c2[bc] = static_cast<acc>(k2);
      c3[bc] = static_cast<acc>(k3);
      if (gadd != nullptr) gadd[bc] = static_cast<acc>(k1 * s_dz[bc] + k2 * s_x[bc] + k3 * S);
    }
  }

  const std::vector<acc> c1_p = units.pattern(c1), c2_p = units.pattern(c2), c3_p = units.pattern(c3);
  const acc scale_in = static_cast<acc>(input_scale);
  units.parallel([&](int64_t, int64_t bi, int64_t offset, int64_t len) {
    const int64_t o = bi * P;
    PATCHDDM_DISPATCH_ISA(choice, isa::cl_grad_apply_span<T, kKeepsDz<T>>(
                                      dyp + offset, ap + offset, gap ? gap + offset : nullptr, gip + offset, len,
                                      P, &r_p[o], &q_p[o], &w_p[o], &b_p[o], &c1_p[o], &c2_p[o], &c3_p[o],
                                      scale_in));
  });

  if (weight.has_value() || bias.has_value()) {
    auto* gw = weight.has_value() ? grad_weight.mutable_data_ptr<acc>() : nullptr;
    auto* gb = bias.has_value() ? grad_bias.mutable_data_ptr<acc>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double sw = 0, sb = 0;
      for (int64_t bi = 0; bi < d.batch; ++bi) {
        sw += s_dzx[bi * C + c];
        sb += s_dz[bi * C + c];
      }
      if (gw != nullptr) gw[c] = static_cast<acc>(sw);
      if (gb != nullptr) gb[c] = static_cast<acc>(sb);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_average, const at::Tensor& input,
    const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t groups, double input_scale) {
  const GroupNormDims d = check_group_norm_silu_backward("patchddm::group_norm_silu_backward", grad_out, grad_average,
                                                         input, add, weight, bias, mean, rstd, groups,
                                                         /*channels_last=*/true);

  const auto acc = group_norm_acc_type(input);
  const auto acc_options = input.options().dtype(acc);
  at::Tensor grad_input = at::empty_like(input, d.layout);
  at::Tensor grad_add = at::empty(add.has_value() ? at::IntArrayRef({d.batch, d.channels}) : at::IntArrayRef({0}), acc_options);
  at::Tensor grad_weight = at::empty({weight.has_value() ? d.channels : 0}, acc_options);
  at::Tensor grad_bias = at::empty({bias.has_value() ? d.channels : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    if (d.channels_last()) {
      backward_channels_last_impl<scalar_t>(grad_out, grad_average, input, add, weight, bias, mean, rstd, d,
                                            input_scale, grad_input, grad_add, grad_weight, grad_bias);
    } else {
      backward_impl<scalar_t>(grad_out, grad_average, input, add, weight, bias, mean, rstd, d, input_scale,
                              grad_input, grad_add, grad_weight, grad_bias);
    }
  });
  return {grad_input, grad_add, grad_weight, grad_bias};
}

// -- apply with given statistics --------------------------------------------------------------

// group_norm_silu_apply: the forward's pass 2 alone, with the caller's mean and rstd (those of a
// whole tensor, applied to one depth slab of it). x and out are channel runs (Contiguous) or
// batch runs of rows (channels last) at their own strides (ApplyLayout); the spans are those of
// the forward over a tensor of x's shape, each moved to its place in x and in out.
template <typename T>
void apply_impl(const at::Tensor& x, const ApplyLayout& xl, const at::Tensor& mean, const at::Tensor& rstd,
                const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const GroupNormDims& d, const at::Tensor& out,
                const ApplyLayout& ol) {
  using acc = typename Elem<T>::acc;
  const cpu::Isa choice = cpu::cpu_isa();
  const int64_t C = d.channels, S = d.spatial, bc_count = d.batch * C;
  const auto* xp = storage_ptr<T>(x);
  auto* yp = mutable_storage_ptr<T>(out);
  const std::vector<double> add_v = values_or<double>(add, bc_count, 0.0);
  const std::vector<acc> w = values_or<acc>(weight, C, acc(1));
  const std::vector<acc> b = values_or<acc>(bias, C, acc(0));
  std::vector<acc> scale(bc_count), shift(bc_count);
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    group_constants(bg, C, d.per_group(), mean.const_data_ptr<acc>(), rstd.const_data_ptr<acc>(), add_v, w, b,
                    scale.data(), shift.data());
  }
  if (!d.channels_last()) {
    const Units units(bc_count, S);
    at::parallel_for(0, units.count(), units.grain(), [&](int64_t begin, int64_t end) {
      units.for_each(begin, end, [&](int64_t, int64_t bc, int64_t offset, int64_t len) {
        const int64_t bi = bc / C, c = bc % C, start = offset - bc * S;
        PATCHDDM_DISPATCH_ISA(choice, isa::apply_span<T>(xp + bi * xl.batch_stride + c * xl.channel_stride + start,
                                                         yp + bi * ol.batch_stride + c * ol.channel_stride + start,
                                                         len, scale[bc], shift[bc]));
      });
    });
    return;
  }
  const RowChunks units(d.batch, S, C);
  const int64_t P = units.period;
  const std::vector<acc> scale_p = units.pattern(scale), shift_p = units.pattern(shift);
  units.parallel([&](int64_t, int64_t bi, int64_t offset, int64_t len) {
    const int64_t start = offset - bi * S * C;  // whole rows from the batch entry's first
    PATCHDDM_DISPATCH_ISA(choice, isa::cl_apply_span<T>(xp + bi * xl.batch_stride + start,
                                                        yp + bi * ol.batch_stride + start, len, P,
                                                        &scale_p[bi * P], &shift_p[bi * P]));
  });
}

void group_norm_silu_apply_out_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                   const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, int64_t groups, const at::Tensor& out) {
  const auto [d, xl, ol] = check_group_norm_silu_apply("patchddm::group_norm_silu_apply_out", x, mean, rstd, add,
                                                       weight, bias, groups, out);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_apply_cpu", [&] {
    apply_impl<scalar_t>(x, xl, mean, rstd, add, weight, bias, d, out, *ol);
  });
}

at::Tensor group_norm_silu_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& add, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, int64_t groups) {
  const auto [d, xl, ol] = check_group_norm_silu_apply("patchddm::group_norm_silu_apply", x, mean, rstd, add,
                                                       weight, bias, groups, std::nullopt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(d.layout));  // x's layout, packed
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_apply_cpu", [&] {
    apply_impl<scalar_t>(x, xl, mean, rstd, add, weight, bias, d, out, *apply_layout_as(out, d.layout));
  });
  return out;
}

// -- statistics alone ---------------------------------------------------------------------------

// group_norm_silu_stats: the forward's pass 1 and group statistics alone, through the same
// ContiguousStats / ChannelsLastStats calls as the forward, so its mean and rstd are the
// forward's bits (the slab forward gathers a whole tensor's statistics with it).
template <typename T>
void stats_impl(const at::Tensor& x, const std::optional<at::Tensor>& add, const GroupNormDims& d, double eps,
                at::Tensor& mean, at::Tensor& rstd) {
  const std::vector<double> add_v = values_or<double>(add, d.batch * d.channels, 0.0);
  at::Tensor no_average;  // no skip: nothing averaged, nothing written
  if (d.channels_last()) {
    ChannelsLastStats<T> stats(x, std::nullopt, no_average, add_v, d, eps, mean, rstd);
    stats.run();
    return;
  }
  ContiguousStats<T> stats(x, std::nullopt, no_average, add_v, d, eps, mean, rstd);
  run_passes(
      stats.units, d.batch * d.groups, d.per_group(),
      [&](int64_t u, int64_t bc, int64_t offset, int64_t len) { stats.unit(u, bc, offset, len); },
      [&](int64_t bg) { stats.finish(bg); }, nullptr);
}

std::tuple<at::Tensor, at::Tensor> group_norm_silu_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& add,
                                                             int64_t groups, double eps) {
  const GroupNormDims d = check_group_norm_silu_stats("patchddm::group_norm_silu_stats", x, add, groups, eps);
  auto [mean, rstd] = group_norm_stats_outputs(x, d, eps);
  if (x.numel() == 0) return {mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_stats_cpu", [&] {
    stats_impl<scalar_t>(x, add, d, eps, mean, rstd);
  });
  return {mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(patchddm, CPU, m) {
  m.impl("group_norm_silu_stats", &group_norm_silu_stats_cpu);
  m.impl("group_norm_silu_forward", &group_norm_silu_forward_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
  m.impl("group_norm_silu_apply", &group_norm_silu_apply_cpu);
  m.impl("group_norm_silu_apply_out", &group_norm_silu_apply_out_cpu);
}

}  // namespace patchddm
