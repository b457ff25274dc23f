// qsengine core: the routing Monte Carlo engine (see routing.h for the model).
//
// The engine owns the request's Sampler (samplers.h: who picks which experts)
// and turns each sample's selections into statistics (routing_stats.h): per
// work block into range-tracked histograms and moments, merged in block order.
// Precision-targeted runs (rtol > 0) run the blocks in rounds and stop at a
// checkpoint of the fixed schedule described in routing.h.
#include "core/routing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "core/errors.h"
#include "core/samplers.h"

namespace qs::routing {

namespace {

// Per-worker scratch: the sampler's state plus the statistics accumulators.
struct Scratch : SamplerScratch {
  std::vector<std::uint32_t> slot_mark;  // [slots] sample stamp (replicas only)
  std::vector<std::int32_t> touched;     // experts touched in this sample
  std::vector<std::int64_t> u_g, n_g;    // [G]
  TrackedHist unique, umax, nmax, tpe, layer_t, step_t;
  std::uint32_t slot_stamp = 0;
};

struct BlockResult {
  RangeHist unique, umax, nmax, tpe, layer_t, step_t;
  std::vector<std::uint64_t> gpu_u, gpu_n;
  Moments layer_m, step_m;
};

class ScratchPool {
 public:
  template <class Make>
  std::unique_ptr<Scratch> acquire(Make make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        auto s = std::move(free_.back());
        free_.pop_back();
        return s;
      }
    }
    return make();
  }
  void release(std::unique_ptr<Scratch> s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(s));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Scratch>> free_;
};

std::uint32_t next_stamp(std::uint32_t& stamp, std::vector<std::uint32_t>& marks) {
  if (++stamp == 0) {
    std::fill(marks.begin(), marks.end(), 0);
    stamp = 1;
  }
  return stamp;
}

bool has_replicas(const RouteRequest& req) {
  for (const auto& gl : req.placement.expert_gpus)
    if (gl.size() > 1) return true;
  return false;
}

class Engine {
 public:
  Engine(const RouteRequest& req, const CancelToken* cancel)
      : req_(req), cancel_(cancel), sampler_(req, cancel, has_replicas(req)) {
    E_ = req.experts;
    k_ = req.top_k;
    B_ = req.batch;
    L_ = req.layers;
    G_ = req.placement.gpus;
    bk_ = B_ * k_;
    block_ = block_size(req);
    // Placement -> slots (expert replicas).
    slot_base_.resize(E_);
    reps_.resize(E_);
    std::int64_t s = 0;
    for (std::int64_t e = 0; e < E_; ++e) {
      const auto& gl = req.placement.expert_gpus[e];
      slot_base_[e] = static_cast<std::int32_t>(s);
      reps_[e] = static_cast<std::int32_t>(gl.size());
      if (gl.size() > 1) replicas_ = true;
      for (std::int32_t g : gl) slot_gpu_.push_back(g);
      s += static_cast<std::int64_t>(gl.size());
    }
    slots_ = s;
    gpu_of_.resize(E_);
    for (std::int64_t e = 0; e < E_; ++e) gpu_of_[e] = slot_gpu_[slot_base_[e]];
    record_ = nullptr;
    // Cost bounds -> log-histogram layout.
    if (req.cost.enabled) {
      double min_a = std::numeric_limits<double>::infinity(), min_b = min_a, hi = 0.0;
      std::vector<std::int64_t> slots_on(static_cast<std::size_t>(G_), 0);
      for (std::int32_t g : slot_gpu_) ++slots_on[g];
      for (std::int64_t g = 0; g < G_; ++g) {
        min_a = std::min(min_a, req.cost.a[g]);
        min_b = std::min(min_b, req.cost.b[g]);
        hi = std::max(hi, std::max(req.cost.a[g] * static_cast<double>(std::min(slots_on[g], bk_)),
                                   req.cost.b[g] * static_cast<double>(bk_)));
      }
      const double lo = std::max(min_b * static_cast<double>(bk_) / static_cast<double>(G_),
                                 min_a * static_cast<double>(k_) / static_cast<double>(G_));
      layer_hist_ = LogHistogram::covering(lo, hi);
      step_hist_ = LogHistogram::covering(lo * static_cast<double>(L_), hi * static_cast<double>(L_));
    }
  }

  std::unique_ptr<Scratch> make_scratch() const {
    auto s = std::make_unique<Scratch>();
    sampler_.init_scratch(*s);
    if (replicas_) s->slot_mark.assign(static_cast<std::size_t>(slots_), 0);
    s->touched.assign(static_cast<std::size_t>(E_ + 1), 0);
    s->u_g.assign(G_, 0);
    s->n_g.assign(G_, 0);
    s->unique.resize(E_ + 1);
    s->umax.resize(E_ + 1);
    s->nmax.resize(bk_ + 1);
    s->tpe.resize(B_ + 1);
    if (req_.cost.enabled) {
      s->layer_t.resize(layer_hist_.bins);
      s->step_t.resize(step_hist_.bins);
    }
    return s;
  }

  RouteResult run() {
    RouteResult res;
    res.experts = E_;
    res.top_k = k_;
    res.batch = B_;
    res.layers = L_;
    res.gpus = G_;
    res.block_size = block_;
    res.unique_hist.assign(E_ + 1, 0);
    res.gpu_unique_max_hist.assign(E_ + 1, 0);
    res.gpu_assign_max_hist.assign(bk_ + 1, 0);
    res.tokens_per_expert_hist.assign(B_ + 1, 0);
    res.gpu_unique_sum.assign(G_, 0);
    res.gpu_assign_sum.assign(G_, 0);
    res.layer_weights = sampler_.weights();
    res.weight_tables = sampler_.tables();
    res.has_cost = req_.cost.enabled;
    if (res.has_cost) {
      res.layer_time_hist = layer_hist_;
      res.layer_time_hist.counts.assign(layer_hist_.bins, 0);
      res.step_time_hist = step_hist_;
      res.step_time_hist.counts.assign(step_hist_.bins, 0);
    }
    if (req_.record)
      res.selections.assign(
          static_cast<std::size_t>(req_.microbatches) * static_cast<std::size_t>(L_) * static_cast<std::size_t>(bk_),
          0);
    record_ = req_.record ? res.selections.data() : nullptr;

    const std::int64_t cap_blocks = (req_.microbatches + block_ - 1) / block_;
    ScratchPool pool;
    std::optional<Sections> sections;
    std::int64_t blocks_per_section = 1;
    auto compute = [&](std::uint64_t b) -> BlockResult {
      auto s = pool.acquire([&] { return make_scratch(); });
      BlockResult r = run_block(static_cast<std::int64_t>(b), *s);
      pool.release(std::move(s));
      return r;
    };
    auto merge = [&](RouteResult& acc, BlockResult&& r, std::int64_t b) {
      if (sections) {
        // The precision statistic of this block, into its section.
        const std::int64_t j = b / blocks_per_section;
        sections->add(j, acc.has_cost ? r.step_t : r.nmax, r.step_m);
      }
      add_range(acc.unique_hist, r.unique);
      add_range(acc.gpu_unique_max_hist, r.umax);
      add_range(acc.gpu_assign_max_hist, r.nmax);
      add_range(acc.tokens_per_expert_hist, r.tpe);
      for (std::int64_t g = 0; g < G_; ++g) {
        acc.gpu_unique_sum[g] += r.gpu_u[g];
        acc.gpu_assign_sum[g] += r.gpu_n[g];
      }
      if (acc.has_cost) {
        add_range(acc.layer_time_hist.counts, r.layer_t);
        add_range(acc.step_time_hist.counts, r.step_t);
        acc.layer_time.merge(r.layer_m);
        acc.step_time.merge(r.step_m);
      }
    };
    const unsigned threads = resolve_threads(req_.threads);
    // Blocks [b0, b1), merged in block order (ordered_block_reduce numbers them from 0).
    auto run_blocks = [&](std::int64_t b0, std::int64_t b1) {
      ordered_block_reduce<BlockResult>(
          static_cast<std::uint64_t>(b1 - b0), threads, res,
          [&](std::uint64_t i) { return compute(static_cast<std::uint64_t>(b0) + i); },
          [&](RouteResult& acc, BlockResult&& r) {
            // Merges arrive in order: count them to know the block number.
            merge(acc, std::move(r), b0 + merged_++);
          },
          cancel_);
    };

    std::int64_t done = 0;
    if (req_.rtol <= 0.0) {
      merged_ = 0;
      run_blocks(0, cap_blocks);
      done = cap_blocks;
    } else {
      sections.emplace(precision_values(), req_.cost.enabled, 2 * kPrecisionSections);
      // Smallest power of two of blocks per section giving kMinSectionSamples samples.
      const std::int64_t per_block = block_ * (req_.cost.enabled ? 1 : L_);
      while (blocks_per_section * per_block < kMinSectionSamples) blocks_per_section *= 2;
      std::int64_t nsec = kPrecisionSections;  // sections after this round
      res.rtol = req_.rtol;
      for (;;) {
        const std::int64_t target = std::min(cap_blocks, nsec * blocks_per_section);
        merged_ = 0;
        run_blocks(done, target);
        done = target;
        const Precision p = sections->precision(0.99);
        ++res.checkpoints;
        res.rse_mean = p.rse_mean;
        res.rse_p99 = p.rse_p99;
        res.precision_sections = p.sections;
        if (p.rse_mean <= req_.rtol && p.rse_p99 <= req_.rtol) {
          res.target_reached = true;
          break;
        }
        if (done >= cap_blocks) break;
        nsec += kPrecisionSections / 4;
        if (nsec > 2 * kPrecisionSections) {
          sections->fold_pairs();
          blocks_per_section *= 2;
          nsec = kPrecisionSections + kPrecisionSections / 4;
        }
      }
    }
    res.blocks = done;
    res.microbatches = std::min(req_.microbatches, done * block_);
    res.samples = static_cast<std::uint64_t>(res.microbatches) * static_cast<std::uint64_t>(L_);
    if (req_.record) res.selections.resize(static_cast<std::size_t>(res.samples) * static_cast<std::size_t>(bk_));
    return res;
  }

 private:
  void check_cancel() const {
    if (cancel_ && cancel_->cancelled()) throw Cancelled();
  }

  // Values of the precision statistic's histogram bins (ascending).
  std::vector<double> precision_values() const {
    std::vector<double> v;
    if (req_.cost.enabled) {
      v.resize(static_cast<std::size_t>(step_hist_.bins));
      for (std::int64_t i = 0; i < step_hist_.bins; ++i)
        v[i] = step_hist_.lo * std::pow(kLogBinRatio, static_cast<double>(i) + 0.5);  // geometric bin centre
    } else {
      v.resize(static_cast<std::size_t>(bk_ + 1));
      for (std::int64_t i = 0; i <= bk_; ++i) v[i] = static_cast<double>(i);
    }
    return v;
  }

  // Statistics of s.sel into the scratch accumulators; returns the layer time.
  template <bool kReplicas>
  double account(Scratch& s, BlockResult& r) const {
    const std::int32_t* sel = s.sel.data();
    std::uint32_t* cnt = s.cnt.data();
    std::int64_t* u_g = s.u_g.data();
    std::int64_t* n_g = s.n_g.data();
    const std::int32_t* gpu_of = gpu_of_.data();
    std::int32_t* touched = s.touched.data();
    std::int64_t nt = 0;
    if constexpr (kReplicas) {
      // Each (expert, replica) slot counts once per sample on its GPU.
      const std::uint32_t sstamp = next_stamp(s.slot_stamp, s.slot_mark);
      for (std::int64_t t = 0; t < B_; ++t) {
        for (std::int64_t j = 0; j < k_; ++j) {
          const std::int32_t e = sel[t * k_ + j];
          const std::int32_t slot = slot_base_[e] + static_cast<std::int32_t>(t % reps_[e]);
          const std::int32_t g = slot_gpu_[slot];
          ++n_g[g];
          if (s.slot_mark[slot] != sstamp) {
            s.slot_mark[slot] = sstamp;
            ++u_g[g];
          }
          touched[nt] = e;
          nt += cnt[e]++ == 0;
        }
      }
    } else if (s.counted) {
      // Counts already made while drawing (Independent): one pass over the
      // experts gives u, u_g, n_g and the tokens-per-expert histogram.
      std::uint64_t* tpe = s.tpe.c.data();
      std::uint32_t u = 0, cmax = 0;
      for (std::int64_t e = 0; e < E_; ++e) {
        const std::uint32_t c = cnt[e];
        cnt[e] = 0;
        const std::uint32_t nz = c != 0;
        const std::int32_t g = gpu_of[e];
        u += nz;
        u_g[g] += nz;
        n_g[g] += c;
        ++tpe[c];
        cmax = std::max(cmax, c);
      }
      s.counted = false;
      s.unique.add(u);
      s.tpe.note(0);
      s.tpe.note(cmax);
      return finish_account(s, r);
    } else {
      // Branch-free first-touch detection; per-GPU figures follow from the
      // per-expert counts of the touched experts.
      for (std::int64_t i = 0; i < bk_; ++i) {
        const std::int32_t e = sel[i];
        touched[nt] = e;
        nt += cnt[e]++ == 0;
      }
      for (std::int64_t i = 0; i < nt; ++i) {
        const std::int32_t e = touched[i];
        const std::int32_t g = gpu_of[e];
        ++u_g[g];
        n_g[g] += cnt[e];
      }
    }
    const std::int64_t u = nt;
    s.unique.add(u);
    std::uint32_t cmax = 0, cmin = 0xFFFFFFFFu;
    std::uint64_t* tpe = s.tpe.c.data();
    for (std::int64_t i = 0; i < nt; ++i) {
      const std::int32_t e = touched[i];
      const std::uint32_t c = cnt[e];
      ++tpe[c];
      cmax = std::max(cmax, c);
      cmin = std::min(cmin, c);
      cnt[e] = 0;
    }
    s.tpe.note(cmin);  // the range taken at block end must cover every count written
    s.tpe.note(cmax);
    if (u < E_) s.tpe.add(0, static_cast<std::uint64_t>(E_ - u));
    return finish_account(s, r);
  }

  // Per-GPU maxima and sums of one sample (u_g, n_g), reset; the layer time.
  double finish_account(Scratch& s, BlockResult& r) const {
    std::int64_t* u_g = s.u_g.data();
    std::int64_t* n_g = s.n_g.data();
    std::int64_t umax = 0, nmax = 0;
    double lt = 0.0;
    for (std::int64_t g = 0; g < G_; ++g) {
      umax = std::max(umax, u_g[g]);
      nmax = std::max(nmax, n_g[g]);
      r.gpu_u[g] += static_cast<std::uint64_t>(u_g[g]);
      r.gpu_n[g] += static_cast<std::uint64_t>(n_g[g]);
      if (req_.cost.enabled)
        lt = std::max(lt, std::max(req_.cost.a[g] * static_cast<double>(u_g[g]),
                                   req_.cost.b[g] * static_cast<double>(n_g[g])));
      u_g[g] = 0;
      n_g[g] = 0;
    }
    s.umax.add(umax);
    s.nmax.add(nmax);
    return lt;
  }

  BlockResult run_block(std::int64_t b, Scratch& s) const {
    BlockResult r;
    r.gpu_u.assign(G_, 0);
    r.gpu_n.assign(G_, 0);
    PhiloxStream rng(req_.key, static_cast<std::uint64_t>(b), kPurposeRouting);
    // Fresh stamps per block: the block's result must not depend on which
    // blocks this scratch served before.
    sampler_.begin_block(s, b);
    std::fill(s.slot_mark.begin(), s.slot_mark.end(), 0);
    s.slot_stamp = 0;
    const std::int64_t m0 = b * block_;
    const std::int64_t m1 = std::min(req_.microbatches, m0 + block_);
    for (std::int64_t m = m0; m < m1; ++m) {
      double step = 0.0;
      for (std::int64_t l = 0; l < L_; ++l) {
        check_cancel();
        sampler_.sample(m, l, m == m0, rng, s);
        if (record_) {
          std::memcpy(record_ + (m * L_ + l) * bk_, s.sel.data(), static_cast<std::size_t>(bk_) * sizeof(std::int32_t));
        }
        const double lt = replicas_ ? account<true>(s, r) : account<false>(s, r);
        if (req_.cost.enabled) {
          r.layer_m.add(lt);
          s.layer_t.add(layer_hist_.bin_of(lt));
          step += lt;
        }
      }
      if (req_.cost.enabled) {
        r.step_m.add(step);
        s.step_t.add(step_hist_.bin_of(step));
      }
    }
    r.unique = s.unique.take();
    r.umax = s.umax.take();
    r.nmax = s.nmax.take();
    r.tpe = s.tpe.take();
    if (req_.cost.enabled) {
      r.layer_t = s.layer_t.take();
      r.step_t = s.step_t.take();
    }
    return r;
  }

  const RouteRequest& req_;
  const CancelToken* cancel_;
  Sampler sampler_;
  std::int64_t E_ = 0, k_ = 0, B_ = 0, L_ = 0, G_ = 0, bk_ = 0, block_ = 1;
  std::vector<std::int32_t> slot_base_, reps_, slot_gpu_, gpu_of_;
  std::int64_t slots_ = 0;
  bool replicas_ = false;
  LogHistogram layer_hist_, step_hist_;
  std::int32_t* record_ = nullptr;
  std::int64_t merged_ = 0;  // blocks merged in the current round
};

}  // namespace

RouteResult route(const RouteRequest& req, const CancelToken* cancel) {
  validate(req);
  const unsigned threads = resolve_threads(req.threads);
  const std::uint64_t need = estimate_memory(req, threads);
  if (need > req.memory_limit) {
    std::ostringstream os;
    os << "route(experts=" << req.experts << ", top_k=" << req.top_k << ", batch=" << req.batch
       << ", microbatches=" << req.microbatches << ", layers=" << req.layers << ", threads=" << threads
       << ") would need about " << need << " bytes, above the memory limit of " << req.memory_limit
       << " bytes (qsengine.set_memory_limit or QSENGINE_MAX_MEMORY)";
    throw ResourceLimitExceeded(os.str());
  }
  Engine engine(req, cancel);
  return engine.run();
}

}  // namespace qs::routing

