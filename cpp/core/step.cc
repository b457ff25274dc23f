// qsengine core: the decode step model's one forward pass (see step.h and
// docs/model.md, "The decode step", "Calibrated kernels", "Communication").
#include "core/step.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/errors.h"
#include "core/step_kernels.h"

namespace qs {
namespace step {
namespace {

using namespace detail;  // NOLINT: the step model's own kernels

struct Recorder {
  const PassDetail& d;
  std::int64_t lanes, i;
  bool write;  // false while the block's soft maxima are being recorded
  void keep(Piece p, double time, double bytes, double flops, double count, bool present, bool bw) const {
    if (d.time == nullptr || !write) return;
    const std::int64_t at = static_cast<std::int64_t>(p) * lanes + i;
    d.time[at] = time;
    d.bytes[at] = bytes;
    d.flops[at] = flops;
    d.count[at] = count;
    d.present[at] = present ? 1 : 0;
    d.bandwidth_bound[at] = bw ? 1 : 0;
  }
};

void one_lane(const Lane& l, double ffn_params, double batch, double ctx, double tokens, double moe_in_mean, double moe_in_p50,
              double moe_in_p99, const Recorder& rec, SoftMaxTape& sm, double* res) {
  const bool detail = rec.d.time != nullptr;
  const double micro = batch / l.pp;
  const bool adp = l.attn_dp > 0;
  const double shard = adp ? 1.0 : l.tp;
  // speculative verify pass: token rows x (d + 1); weights and each sequence's KV read once
  const double spec_rows = 1.0 + l.draft;
  const double micro_rows = micro * spec_rows;
  const double seqs_kv = adp ? micro / l.tp : micro;  // sequences per attention group
  const double seqs = seqs_kv * spec_rows;            // token rows per attention group
  const double ctx_local = l.window > 0 ? np_min(ctx, l.window) : ctx;
  const bool cal = l.kern > 0;
  const bool roof_work = detail || !cal;

  double compute = 0.0;
  // attention: full-context layers, then local-window layers
  const double norm_bytes = 2 * l.d * l.wb;
  const double pn[4] = {l.ap_n1, l.ap_n2, l.ap_n3, l.ap_n4};
  const double pk[4] = {l.ap_k1, l.ap_k2, l.ap_k3, l.ap_k4};
  for (int a = 0; a < 2; ++a) {
    const double nl = a == 0 ? l.layers - l.local : l.local;
    const double c = a == 0 ? ctx : ctx_local;
    if (!(nl > 0) && !detail) {  // no such layers: the piece is 0
      if (a == 1) compute = compute + 0.0;
      else compute = 0.0;
      continue;
    }
    double t_r = 0.0, w = 0.0, kv = 0.0, fl = 0.0, t_c = 0.0;
    bool b_r = false, b_c = false;
    if (roof_work) {
      w = l.attn_params * l.wb / shard + norm_bytes;
      kv = seqs_kv * c * l.kv_layer / l.kv_split;
      fl = seqs * (l.attn_proj_flops + l.attn_ctx_flops * c) / shard;
      t_r = roof_time(w + kv, fl, l.bw, l.flops, &b_r);
    }
    if (cal) {
      // the fitted kernel streams each sequence's KV once; the d extra query rows of a verify pass add their
      // score FLOPs at the kernel's fitted compute rate (tf: one row's compute term)
      double tb = 0.0, tf = 0.0;
      t_c = attention_impl(l, seqs_kv, c, &tb, &tf, sm);
      t_c = t_c + l.draft * tf;
      tf = tf * spec_rows;
      bool unused = false;
      t_c = t_c + gemms(l, seqs, pn, pk, &unused, sm);
      b_c = tb >= tf;
    }
    const double t = cal ? t_c : t_r;
    const double piece = nl > 0 ? t * nl : 0.0;
    compute = a == 0 ? piece : compute + piece;
    rec.keep(a == 0 ? Piece::kAttention : Piece::kAttentionLocal, piece, (w + kv) * nl, fl * nl, nl, nl > 0,
             cal ? b_c : b_r);
  }
  // dense FFN; a dense model under attention-DP runs its FFN and LM head tensor-parallel over the replica's tp GPUs
  const bool dense_adp = adp && l.moe_layers == 0;
  const double fshard = dense_adp ? l.tp : shard;
  const double ftok = dense_adp ? micro_rows : seqs;
  {
    const bool has = l.dense_layers > 0 && ffn_params > 0;
    double t_r = 0.0, w = 0.0, fl = 0.0, t_c = 0.0;
    bool b_r = false, b_c = false;
    if (roof_work) {
      w = ffn_params * l.wb / fshard;
      fl = 2.0 * ftok * ffn_params / fshard;
      t_r = roof_time(w, fl, l.bw, l.flops, &b_r);
    }
    if (cal) {
      // FFN width per GPU, from P = mats·d·w (+ (mats-1)·w + d with biases; Model._ffn_params)
      const double width =
          (ffn_params - l.ffn_bias * l.d) / (l.ffn_mats * l.d + l.ffn_bias * (l.ffn_mats - 1)) / fshard;
      const double n[2] = {(l.ffn_mats - 1) * width, width > 0 ? l.d : 0.0};
      const double k[2] = {l.d, width};
      t_c = gemms(l, ftok, n, k, &b_c, sm);
    }
    const double t = cal ? t_c : t_r;
    const double piece = has ? t * l.dense_layers : 0.0;
    compute = compute + piece;
    rec.keep(Piece::kDenseFfn, piece, w * l.dense_layers, fl * l.dense_layers, l.dense_layers, has,
             cal ? b_c : b_r);
  }
  // MoE: router + shared experts, routed experts (the straggler, given)
  const double n_moe = l.moe_layers;
  const bool is_moe = n_moe > 0;
  double moe_mean = 0.0, moe_p50 = 0.0, moe_p99 = 0.0;
  if (is_moe || detail) {
    double t_r = 0.0, per_layer = 0.0, fl = 0.0, t_c = 0.0;
    bool b_r = false, b_c = false;
    if (roof_work) {
      per_layer = l.router_params * l.wb / shard + l.shared_params * l.eb / shard;
      fl = 2.0 * seqs * (l.router_params + l.shared_params) / shard;
      t_r = roof_time(per_layer, fl, l.bw, l.flops, &b_r);
    }
    if (cal) {
      const double n[3] = {is_moe ? l.experts : 0.0, l.sh_n, l.sh_k > 0 ? l.d : 0.0};
      const double k[3] = {l.d, l.d, l.sh_k};
      t_c = gemms(l, seqs, n, k, &b_c, sm);
    }
    const double t = cal ? t_c : t_r;
    const double piece = is_moe ? t * n_moe : 0.0;
    compute = compute + piece;
    rec.keep(Piece::kRouterShared, piece, per_layer * n_moe, fl * n_moe, n_moe, is_moe, cal ? b_c : b_r);
    const double fix = n_moe * l.moe_fix;  // the grouped GEMM's fixed per-layer cost (0 for the roofline)
    if (is_moe) {
      moe_mean = moe_in_mean + fix;
      moe_p50 = moe_in_p50 + fix;
      moe_p99 = moe_in_p99 + fix;
    }
    compute = compute + moe_mean;
    if (detail) {
      const double p1 = l.top_k / l.experts;
      // slots per GPU, (E + redundant)/ep; a slot's touch probability taken as uniform routing's
      const double mean_u =
          floor_div(l.experts + l.redundant, l.ep) * -std::expm1(tokens * std::log1p(-np_min(p1, 1 - 1e-15)));
      const double mean_n = tokens * l.top_k / l.ep;
      const double eb_layer = mean_u * l.expert_params * l.eb / l.etp;
      const double fl_layer = 2.0 * mean_n * l.expert_params / l.etp;
      bool bwb = false;
      roof_time(eb_layer, fl_layer, l.bw, l.flops, &bwb);
      if (cal) bwb = l.moe_a * mean_u >= l.moe_b * mean_n;
      rec.keep(Piece::kRoutedExperts, moe_mean, eb_layer * n_moe, fl_layer * n_moe, n_moe, is_moe, bwb);
    }
  }
  // LM head
  {
    double t_r = 0.0, w = 0.0, fl = 0.0, t_c = 0.0;
    bool b_r = false, b_c = false;
    if (roof_work) {
      w = l.vd * l.wb / fshard;
      fl = 2.0 * ftok * l.vd / fshard;
      t_r = roof_time(w, fl, l.bw, l.flops, &b_r);
    }
    if (cal) {  // lm_n is vocab / shard: a dense model under attention-DP splits its LM head tp ways
      const double n[1] = {dense_adp ? l.lm_n / l.tp : l.lm_n};
      const double k[1] = {l.d};
      t_c = gemms(l, ftok, n, k, &b_c, sm);
    }
    const double t = cal ? t_c : t_r;
    compute = compute + t;
    rec.keep(Piece::kLmHead, t, w, fl, 1.0, true, cal ? b_c : b_r);
  }

  // communication: fitted collectives inside a scale-up domain for calibrated lanes, else the link model
  double comm = 0.0;
  {
    const double act = seqs * l.d * l.ab;
    const double n = 2 * l.layers;
    double t = allreduce_time(l, act, l.tp);
    if (cal && !std::isnan(l.ar_a1)) t = fitted_collective(act, l.ar_a1, l.ar_b1, l.ar_a2, l.ar_b2);
    comm = shard > 1 ? t * n : 0.0;
    rec.keep(Piece::kTpAllReduce, comm, act * n, 0.0, n, shard > 1, false);
  }
  {
    // attention-DP + TP FFN (dense): all-gather the replica's tokens before each dense FFN (and the LM head) and
    // reduce-scatter its output: a ring all-reduce's bytes of the replica's tokens plus one more latency
    const double gathered = micro_rows * l.d * l.ab;
    const double n_adp = l.dense_layers + 1;
    double t = allreduce_time(l, gathered, l.tp) + l.latency;
    if (cal && !std::isnan(l.ar_a1)) {  // two fitted calls, each moving half an all-reduce's bytes
      t = 2.0 * fitted_collective(gathered / 2.0, l.ar_a1, l.ar_b1, l.ar_a2, l.ar_b2);
    }
    const bool on = dense_adp && l.tp > 1;
    const double piece = on ? t * n_adp : 0.0;
    comm = comm + piece;
    rec.keep(Piece::kAttnDpGather, piece, gathered * n_adp, 0.0, n_adp, on, false);
  }
  if (is_moe || detail) {
    const bool has_ep = is_moe && l.ep > 1;
    const double stage_gpus = l.dp * l.tp;
    const double tokens_src = micro_rows * l.dp / stage_gpus;
    const double group = l.ep * l.etp;
    const double remote = (l.ep - 1) / l.ep;
    // dispatch (Precision.dispatch_bytes per element) and combine (.combine_bytes), one all-to-all each
    double t = 0.0, sent = 0.0;
    const double el[2] = {l.db, l.cb};
    for (int j = 0; j < 2; ++j) {
      const double nbytes = tokens_src * l.top_k * l.d * el[j] * remote;
      double t_x = ep_alltoall_time(l, nbytes, group);
      if (cal && !std::isnan(l.aa_a1)) {  // NCCL all-to-all of the whole send buffer (self chunk included)
        double fit = fitted_collective(tokens_src * l.top_k * l.d * el[j], l.aa_a1, l.aa_b1, l.aa_a2, l.aa_b2);
        // a fit measured on a switch (transferred to TPUs) is a crossbar: a torus adds its bisection bound
        if (l.a2a_torus > 0) fit = np_max(fit, t_x);
        t_x = fit;
      }
      t = j == 0 ? t_x : t + t_x;
      sent = j == 0 ? nbytes : sent + nbytes;
    }
    const double piece = has_ep ? t * n_moe : 0.0;
    comm = comm + piece;
    rec.keep(Piece::kEpAllToAll, piece, sent * n_moe, 0.0, n_moe, has_ep, false);
    const bool has_etp = is_moe && l.etp > 1 && !(shard > 1 && l.etp == l.tp && l.ep == 1);
    const double nbytes = tokens / np_max(l.ep, 1.0) * l.top_k * l.d * l.ab;
    double te = allreduce_time(l, nbytes, l.etp);
    if (cal && !std::isnan(l.er_a1)) te = fitted_collective(nbytes, l.er_a1, l.er_b1, l.er_a2, l.er_b2);
    const double piece_e = has_etp ? te * n_moe : 0.0;
    comm = comm + piece_e;
    rec.keep(Piece::kExpertTpAllReduce, piece_e, nbytes * n_moe, 0.0, n_moe, has_etp, false);
  }
  {
    const double nbytes = micro_rows * l.d * l.ab;
    const double t = (l.pp - 1) * (l.latency + nbytes / link_bandwidth(l, l.tp * l.pp));
    const double piece = l.pp > 1 ? t : 0.0;
    comm = comm + piece;
    rec.keep(Piece::kPpSend, piece, nbytes * (l.pp - 1), 0.0, l.pp - 1, l.pp > 1, false);
  }

  const bool ov = l.overlap == 1;
  const double time = ov ? np_max(compute, comm) : compute + comm;
  res[0] = time;
  res[3] = compute;
  res[6] = comm;
  if (!is_moe) {  // no straggler: every quantile is the time
    res[1] = res[2] = time;
    res[4] = res[5] = compute;
    return;
  }
  const double det = compute - moe_mean;
  const double c50 = det + moe_p50, c99 = det + moe_p99;
  res[1] = ov ? np_max(c50, comm) : c50 + comm;
  res[2] = ov ? np_max(c99, comm) : c99 + comm;
  res[4] = c50;
  res[5] = c99;
}

}  // namespace

const std::vector<std::string>& field_names() {
  static const std::vector<std::string> names = {
#define QS_STEP_NAME(name) #name,
      QS_STEP_FIELDS(QS_STEP_NAME)
#undef QS_STEP_NAME
  };
  return names;
}

const char* piece_name(Piece p) {
  switch (p) {
    case Piece::kAttention: return "attention";
    case Piece::kAttentionLocal: return "attention (local)";
    case Piece::kDenseFfn: return "dense ffn";
    case Piece::kRouterShared: return "router + shared experts";
    case Piece::kRoutedExperts: return "routed experts (straggler)";
    case Piece::kLmHead: return "lm head";
    case Piece::kTpAllReduce: return "tp all-reduce";
    case Piece::kAttnDpGather: return "attention-dp gather/scatter";
    case Piece::kEpAllToAll: return "ep all-to-all";
    case Piece::kExpertTpAllReduce: return "expert-tp all-reduce";
    case Piece::kPpSend: return "pp send";
    case Piece::kCount: break;
  }
  return "?";
}

bool piece_is_link(Piece p) { return static_cast<int>(p) >= static_cast<int>(Piece::kTpAllReduce); }

double roof_time(double bytes, double flops, double bw, double peak, bool* bandwidth_bound) {
  const double t_bw = bytes / bw;
  const double t_f = flops / peak;
  const bool b = t_bw >= t_f;
  if (bandwidth_bound != nullptr) *bandwidth_bound = b;
  return b ? t_bw : t_f;
}

double soft_max(double x, double y, double p) {
  double r = 0.0;
  soft_max_block(1, &x, &y, &p, &r);
  return r;
}

const std::vector<std::string>& kernel_names() {
  static const std::vector<std::string> names = {"roof",          "gemm",         "attention_core",
                                                 "link_bandwidth", "allreduce",    "ep_alltoall",
                                                 "allreduce_fit", "alltoall_fit", "expert_allreduce_fit"};
  return names;
}

void kernel_over_lanes(Kernel kind, const Column* fields, Column x, Column y, Column z, std::int64_t lanes,
                       double* value, double* bandwidth_term, double* compute_term) {
  if (lanes < 0) throw InvalidArgument("step_kernel: lanes = " + std::to_string(lanes) + ": must be >= 0");
  if (kind == Kernel::kCount) throw InvalidArgument("step_kernel: no such kernel");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // the fields each kernel reads (loading all of them would cost more than most kernels)
  using F = Field;
  static const std::vector<std::vector<F>> reads = {
      {F::bw, F::flops},
      {F::g_pad, F::g_ab, F::g_wb, F::g_bw, F::g_f, F::g_c0, F::g_p},
      {F::at_kvh, F::at_pad, F::at_split, F::at_el, F::at_kvb, F::at_h, F::at_qo, F::at_fl, F::at_bw, F::at_f,
       F::at_c0, F::at_c1, F::at_p},
      {F::domain, F::scaleup, F::internode, F::link_eff},
      {F::domain, F::scaleup, F::internode, F::link_eff, F::latency},
      {F::domain, F::scaleup, F::internode, F::link_eff, F::latency, F::a2a_torus},
      {F::ar_a1, F::ar_b1, F::ar_a2, F::ar_b2},
      {F::aa_a1, F::aa_b1, F::aa_a2, F::aa_b2},
      {F::er_a1, F::er_b1, F::er_a2, F::er_b2}};
  const auto& need = reads[static_cast<std::size_t>(kind)];
  // soft maxima only in the GEMM and the attention core: the other kernels are written by the first pass
  const int passes = kind == Kernel::kGemm || kind == Kernel::kAttentionCore ? 2 : 1;
  SoftMaxTape sm;
  std::vector<Lane> block(static_cast<std::size_t>(std::min(lanes, kBlockLanes)));
  for (std::int64_t lo = 0; lo < lanes; lo += kBlockLanes) {
    const std::int64_t hi = std::min(lanes, lo + kBlockLanes);
    for (std::int64_t i = lo; i < hi; ++i) {
      Lane& l = block[static_cast<std::size_t>(i - lo)];
      double* slots[kNumFields] = {
#define QS_STEP_SLOT(name) &l.name,
          QS_STEP_FIELDS(QS_STEP_SLOT)
#undef QS_STEP_SLOT
      };
      for (const F f : need) {
        const Column& c = fields[static_cast<int>(f)];
        *slots[static_cast<int>(f)] = c.data[c.stride * i];
      }
    }
    sm.reset();
    for (int pass = 0; pass < passes; ++pass) {  // record the block's soft maxima, evaluate them, replay
      const bool write = pass == passes - 1;
      for (std::int64_t i = lo; i < hi; ++i) {
        const Lane& l = block[static_cast<std::size_t>(i - lo)];
        const double a = x.data[x.stride * i], b = y.data[y.stride * i], c = z.data[z.stride * i];
        double v = 0.0, tb = nan, tf = nan;
        switch (kind) {
          case Kernel::kRoof: v = roof_time(a, b, l.bw, l.flops); tb = a / l.bw; tf = b / l.flops; break;
          case Kernel::kGemm: v = gemm_impl(l, a, b, c, &tb, &tf, sm); break;
          case Kernel::kAttentionCore: v = attention_impl(l, a, b, &tb, &tf, sm); break;
          case Kernel::kLinkBandwidth: v = link_bandwidth(l, a); break;
          case Kernel::kAllReduce: v = allreduce_time(l, a, b); break;
          case Kernel::kEpAllToAll: v = ep_alltoall_time(l, a, b); break;
          case Kernel::kAllReduceFit: v = fitted_collective(a, l.ar_a1, l.ar_b1, l.ar_a2, l.ar_b2); break;
          case Kernel::kAllToAllFit: v = fitted_collective(a, l.aa_a1, l.aa_b1, l.aa_a2, l.aa_b2); break;
          default: v = fitted_collective(a, l.er_a1, l.er_b1, l.er_a2, l.er_b2); break;
        }
        if (!write) continue;
        value[i] = v;
        bandwidth_term[i] = tb;
        compute_term[i] = tf;
      }
      if (!write) sm.evaluate_and_replay();
    }
  }
}

double fitted_collective(double bytes, double a1, double b1, double a2, double b2) {
  return np_min(a1 + bytes / b1, a2 + bytes / b2);
}

double link_bandwidth(const Lane& l, double group) {
  return (group <= l.domain ? l.scaleup : l.internode) * l.link_eff;
}

double allreduce_time(const Lane& l, double bytes, double group) {
  if (!(group > 1)) return 0.0;
  return l.latency + 2.0 * (group - 1) / group * bytes / link_bandwidth(l, group);
}

double ep_alltoall_time(const Lane& l, double bytes, double group) {
  const double inter = group <= l.domain ? 0.0 : 1.0 - l.domain / group;
  const double t_in = bytes * (1 - inter) / (l.scaleup * l.link_eff) * np_max(l.a2a_torus, 1.0);
  return l.latency + np_max(t_in, bytes * inter / (l.internode * l.link_eff));
}

void pass_lanes(Lanes lanes, std::int64_t n, const double* batch, const double* context,
                const double* tokens, const double* moe_mean, const double* moe_p50, const double* moe_p99,
                const PassOutput& out, const PassDetail& detail, std::int64_t detail_stride) {
  // Lanes in blocks: the block's soft maxima are recorded (a first evaluation), evaluated together
  // (soft_max_block: SIMD powers) and replayed in the same order by the second evaluation, which writes.
  thread_local SoftMaxTape tape;
  SoftMaxTape& sm = tape;  // the thread's tape, its address looked up once per call
  double res[7];
  for (std::int64_t lo = 0; lo < n; lo += kBlockLanes) {
    const std::int64_t hi = std::min(n, lo + kBlockLanes);
    sm.reset();
    for (int write = 0; write < 2; ++write) {
      for (std::int64_t i = lo; i < hi; ++i) {
        const Recorder rec{detail, detail_stride, i, write == 1};
        one_lane(lanes[i], lanes.ffn_params(i), batch[i], context[i], tokens[i], moe_mean[i], moe_p50[i], moe_p99[i], rec, sm, res);
        if (write == 0) continue;
        out.time[i] = res[0];
        out.p50[i] = res[1];
        out.p99[i] = res[2];
        out.compute[i] = res[3];
        out.compute_p50[i] = res[4];
        out.compute_p99[i] = res[5];
        out.comm[i] = res[6];
      }
      if (write == 0) sm.evaluate_and_replay();
    }
  }
}

void gather_lanes(const Column* fields, std::int64_t lo, std::int64_t hi, Lane* lanes) {
  for (std::int64_t i = lo; i < hi; ++i) {
    Lane& lane = lanes[i - lo];
    double* slots[kNumFields] = {
#define QS_STEP_SLOT(name) &lane.name,
        QS_STEP_FIELDS(QS_STEP_SLOT)
#undef QS_STEP_SLOT
    };
    for (int f = 0; f < kNumFields; ++f) {
      const Column& c = fields[f];
      *slots[f] = c.data[c.stride * i];
    }
  }
}

void check_columns(const Column* fields, const char* who) {
  for (int f = 0; f < kNumFields; ++f) {
    if (fields[f].data == nullptr) {
      throw InvalidArgument(std::string(who) + ": field '" + field_names()[static_cast<std::size_t>(f)] +
                            "' is missing");
    }
  }
}

}  // namespace step
}  // namespace qs
