// qsengine core: the routing models (who picks which experts).
//
// Independent weights (Plackett-Luce from per-expert weights: Uniform,
// PowerLaw, Popularity, Dirichlet), GroupLimited, Sticky and Trace, as
// specified in routing.h. A Sampler holds the per-layer alias tables of one
// request and fills one sample (microbatch m, layer l) of selections into a
// SamplerScratch; it is const and shared by all worker threads, each of which
// owns its scratch. Randomness comes only from the block's streams (routing
// and tie, see routing.h), so a block's selections are a function of the
// request and the block number.
#pragma once

#include <cstdint>
#include <vector>

#include "core/alias.h"
#include "core/parallel.h"
#include "core/philox.h"
#include "core/routing.h"

namespace qs::routing {

// Normalised per-expert weights of weight table `layer` (the base of every
// stochastic model). Per-layer tables draw from (key, layer, kPurposePopularity).
std::vector<double> layer_weights(const RouteRequest& req, std::int64_t layer);
// Number of distinct weight tables: 0 (Trace), 1 (same weights in every
// layer) or layers (Dirichlet, PowerLaw with per-layer ranks).
std::int64_t weight_tables(const RouteRequest& req);

// Per-worker sampling state, reused across blocks (reset by begin_block).
struct SamplerScratch {
  std::vector<std::uint32_t> mark;        // [E+1] token stamp: expert chosen by this token
  std::vector<std::uint32_t> group_mark;  // [groups+1] token stamp: group chosen
  std::vector<std::uint32_t> cnt;         // [E] tokens of this sample per expert
  std::vector<std::int32_t> sel;          // [B*k] selections of one sample
  std::vector<std::int32_t> prev;         // [layers*B*k] Sticky chain state
  std::uint32_t stamp = 0;
  // Expert candidates: i.i.d. draws from the current layer's alias table,
  // converted a whole Philox refill at a time (E = a rejected Lemire draw).
  std::uint32_t cand[4 * PhiloxStream::kWords];  // 16-bit draws: four per word
  std::size_t cand_pos = 0, cand_end = 0;
  const AliasTable* cand_table = nullptr;
  PhiloxStream tie;             // the block's tie stream (kPurposeTie)
  std::uint32_t pos_base = 0;   // Independent: accepted picks so far in this block (mod resets)
  const unsigned char* ind_bytes = nullptr;  // Independent: the stream buffer being drawn from,
  std::uint32_t ind_pos = 0, ind_end = 0;    // its next and end 16- (or 32-) bit draw
  unsigned ind_refills = 0;
  alignas(64) std::uint8_t cand8[4 * PhiloxStream::kWords];  // small tables: converted candidates
  bool counted = false;  // cnt already holds this sample's per-expert counts
};

class Sampler {
 public:
  // replicas: the caller reads SamplerScratch::sel after each sample (it needs
  // each token's index); so does req.record. Otherwise Independent samples
  // count per expert while drawing and may skip storing the selections.
  Sampler(const RouteRequest& req, const CancelToken* cancel, bool replicas);

  // Sizes a fresh scratch for this request.
  void init_scratch(SamplerScratch& s) const;
  // Resets s for work block b: the block's result must not depend on which
  // blocks this scratch served before.
  void begin_block(SamplerScratch& s, std::int64_t b) const;
  // Fills s.sel (or, Independent without replicas or record, only s.cnt with
  // s.counted = true) with the selections of microbatch m (global index),
  // layer l; chain_start: first microbatch of the block (Sticky).
  void sample(std::int64_t m, std::int64_t l, bool chain_start, PhiloxStream& rng, SamplerScratch& s) const;

  // [weight_tables, E] normalised weights, row-major.
  const std::vector<double>& weights() const { return layer_weights_; }
  std::int64_t tables() const { return static_cast<std::int64_t>(tables_.size()); }

 private:
  struct LayerTable {
    AliasTable experts;
    AliasTable groups;  // GroupLimited only
  };

  void check_cancel() const {
    if (cancel_ && cancel_->cancelled()) throw Cancelled();
  }
  static std::uint32_t next_stamp(std::uint32_t& stamp, std::vector<std::uint32_t>& marks);
  static void fill_candidates(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s);
  template <bool kGroups>
  void draw_experts(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s, std::uint32_t stamp,
                    std::int32_t* out, std::int64_t have) const;
  template <bool kSmall, bool kCount, bool kSel, bool kPow2>
  void sample_independent(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s) const;
  template <bool kSmall>
  void dispatch_independent(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s) const;
  static std::uint32_t finish_token(const AliasTable& tab, SamplerScratch& s, std::uint32_t c, std::uint32_t tok_end,
                                    std::int32_t* sel, std::uint32_t base, bool count);
  template <bool kGroups>
  std::int32_t sequential_pick(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s,
                               std::uint32_t stamp) const;
  void draw_groups(const AliasTable& gt, PhiloxStream& cur, SamplerScratch& s, std::uint32_t stamp) const;

  const RouteRequest& req_;
  const CancelToken* cancel_;
  std::int64_t E_ = 0, k_ = 0, B_ = 0, L_ = 0, bk_ = 0;
  std::int64_t groups_ = 0, group_size_ = 1;
  std::vector<std::uint32_t> group_of_;  // [E+1] GroupLimited: group of each expert (E -> groups)
  bool replicas_ = false;
  bool record_ = false;
  std::vector<LayerTable> tables_;
  std::vector<double> layer_weights_;
  bool per_layer_tables_ = false;
  std::uint64_t rho_thr_ = 0;
};

}  // namespace qs::routing
