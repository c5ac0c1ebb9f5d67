// fp32 GEMM throughput of oneDNN's dnnl_sgemm against OpenBLAS's cblas_sgemm on the products of
// one W2 training step (6 layers, 6 heads, dim 384, context 256, batch 8: N = B*T = 2048 rows), at
// 1 and 2 threads. Prints a markdown table with median and best GFLOP/s over --reps timed
// repetitions, after a check that both libraries agree on every shape.
//
// Layout is Hugging Face's Conv1D, row-major: y (N, out) = x (N, in) W (in, out). Each linear layer
// costs three products per step: forward y = x W, backward dX = dY W^T, dW = X^T dY. Attention
// costs per head (T, hd) x (hd, T) for the scores and (T, T) x (T, hd) for the values; those are
// timed as one layer's worth, B*H = 48 heads with their own buffers, as the training step runs them.
//
//   gemm_bench [--reps 20] [--threads 1,2] [--lib both|dnnl|openblas] [--peak | --peak-only]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#if TUTTI_BENCH_OPENBLAS
#include <cblas.h>
#endif

namespace {

// ---- the shapes -------------------------------------------------------------------------------

constexpr int kRows = 8 * 256;  // B*T of W2
constexpr int kHeads = 8 * 6;   // B*H of W2: per-head products in one layer
constexpr int kT = 256, kHd = 64;

// C (M, N) = op(A) op(B), row-major; op(A) is (M, K), op(B) is (K, N).
struct Gemm {
  std::string name;
  int m, n, k;
  bool trans_a, trans_b;
  int batch = 1;  // independent products per timed call (per-head attention)
};

std::vector<Gemm> w2_shapes() {
  std::vector<Gemm> shapes;
  struct Layer { const char* name; int in, out; };
  const Layer layers[] = {{"c_attn", 384, 1152}, {"mlp.c_fc", 384, 1536}, {"mlp.c_proj", 1536, 384}};
  for (const Layer& l : layers) {
    shapes.push_back({std::string(l.name) + " y=xW", kRows, l.out, l.in, false, false});
    shapes.push_back({std::string(l.name) + " dX=dY W^T", kRows, l.in, l.out, false, true});
    shapes.push_back({std::string(l.name) + " dW=X^T dY", l.in, l.out, kRows, true, false});
  }
  shapes.push_back({"attn QK^T x48", kT, kT, kHd, false, true, kHeads});
  shapes.push_back({"attn PV x48", kT, kHd, kT, false, false, kHeads});
  return shapes;
}

double gflop(const Gemm& g) { return 2.0 * g.m * g.n * g.k * g.batch * 1e-9; }

// ---- operands ---------------------------------------------------------------------------------

struct Operands {
  // Per product: A stored (M, K) or (K, M) when transposed, B (K, N) or (N, K), C (M, N).
  std::vector<std::vector<float>> a, b, c;
};

Operands make_operands(const Gemm& g) {
  Operands o;
  unsigned state = 12345;
  auto fill = [&](std::vector<float>& v, size_t n) {
    v.resize(n);
    for (float& x : v) {
      state = state * 1664525u + 1013904223u;
      x = static_cast<float>(state >> 8) * (1.0f / 16777216.0f) - 0.5f;
    }
  };
  o.a.resize(g.batch), o.b.resize(g.batch), o.c.resize(g.batch);
  for (int i = 0; i < g.batch; ++i) {
    fill(o.a[i], size_t(g.m) * g.k);
    fill(o.b[i], size_t(g.k) * g.n);
    o.c[i].assign(size_t(g.m) * g.n, 0.0f);
  }
  return o;
}

// ---- the libraries ----------------------------------------------------------------------------

using GemmFn = std::function<void(const Gemm&, Operands&)>;

void dnnl_gemm(const Gemm& g, Operands& o) {
  const int lda = g.trans_a ? g.m : g.k, ldb = g.trans_b ? g.k : g.n;
  for (int i = 0; i < g.batch; ++i) {
    dnnl_status_t s = dnnl_sgemm(g.trans_a ? 'T' : 'N', g.trans_b ? 'T' : 'N', g.m, g.n, g.k, 1.0f,
                                 o.a[i].data(), lda, o.b[i].data(), ldb, 0.0f, o.c[i].data(), g.n);
    if (s != dnnl_success) throw std::runtime_error("dnnl_sgemm failed on " + g.name);
  }
}

// Per-head products spread over the threads, each a one-thread GEMM (only for batched shapes).
void dnnl_gemm_heads_parallel(const Gemm& g, Operands& o) {
  const int lda = g.trans_a ? g.m : g.k, ldb = g.trans_b ? g.k : g.n;
#pragma omp parallel for schedule(static)
  for (int i = 0; i < g.batch; ++i)
    dnnl_sgemm(g.trans_a ? 'T' : 'N', g.trans_b ? 'T' : 'N', g.m, g.n, g.k, 1.0f, o.a[i].data(), lda,
               o.b[i].data(), ldb, 0.0f, o.c[i].data(), g.n);
}

#if TUTTI_BENCH_OPENBLAS
void openblas_gemm(const Gemm& g, Operands& o) {
  const int lda = g.trans_a ? g.m : g.k, ldb = g.trans_b ? g.k : g.n;
  for (int i = 0; i < g.batch; ++i)
    cblas_sgemm(CblasRowMajor, g.trans_a ? CblasTrans : CblasNoTrans, g.trans_b ? CblasTrans : CblasNoTrans,
                g.m, g.n, g.k, 1.0f, o.a[i].data(), lda, o.b[i].data(), ldb, 0.0f, o.c[i].data(), g.n);
}
#endif

struct Library {
  std::string name;
  GemmFn run;
  std::function<void(int)> set_threads;
  bool batched_only = false;
};

// ---- timing -----------------------------------------------------------------------------------

struct Stats { double median, best; };

Stats time_gemm(const Gemm& g, Operands& o, const GemmFn& fn, int reps) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < 2; ++i) fn(g, o);  // warm caches, thread pools and any packing buffers
  std::vector<double> seconds;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = clock::now();
    fn(g, o);
    seconds.push_back(std::chrono::duration<double>(clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const size_t n = seconds.size();
  const double median = n % 2 ? seconds[n / 2] : 0.5 * (seconds[n / 2 - 1] + seconds[n / 2]);
  return {gflop(g) / median, gflop(g) / seconds.front()};
}

// The largest relative difference between two libraries' results (inputs are the same).
double max_rel_diff(const Gemm& g, const GemmFn& f1, const GemmFn& f2) {
  Operands o1 = make_operands(g), o2 = make_operands(g);
  f1(g, o1);
  f2(g, o2);
  double worst = 0.0;
  for (int i = 0; i < g.batch; ++i)
    for (size_t j = 0; j < o1.c[i].size(); ++j)
      worst = std::max(worst, std::abs(double(o1.c[i][j]) - o2.c[i][j]) / (1.0 + std::abs(double(o2.c[i][j]))));
  return worst;
}

// ---- FMA peak ---------------------------------------------------------------------------------

// Throughput of independent 256-bit FMAs on every thread: the fp32 ceiling that GEMM approaches.
double fma_peak_gflops(int threads) {
  constexpr long kIters = 200'000'000 / 8;
  double best = 0.0;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      __m256 acc[12];
      for (int j = 0; j < 12; ++j) acc[j] = _mm256_set1_ps(0.001f * (j + omp_get_thread_num()));
      const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
      for (long i = 0; i < kIters; ++i)
        for (int j = 0; j < 12; ++j) acc[j] = _mm256_fmadd_ps(acc[j], mul, add);
      __m256 s = acc[0];
      for (int j = 1; j < 12; ++j) s = _mm256_add_ps(s, acc[j]);
      float lanes[8];
      _mm256_storeu_ps(lanes, s);
      for (float x : lanes) sink += x;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink == 42.0f) std::puts("");  // keeps the loop alive
    best = std::max(best, threads * kIters * 12.0 * 16.0 / dt * 1e-9);
  }
  return best;
}

std::vector<int> parse_threads(const std::string& list) {
  std::vector<int> out;
  size_t pos = 0;
  while (pos < list.size()) {
    const size_t comma = list.find(',', pos);
    out.push_back(std::stoi(list.substr(pos, comma - pos)));
    if (out.back() < 1) throw std::invalid_argument("thread counts must be >= 1");
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

int run(int reps, const std::vector<int>& thread_counts, const std::string& which, bool peak, bool peak_only) {
  if (peak || peak_only) {
    for (int t : thread_counts)
      std::printf("FMA peak (AVX2, %d thread%s): %.1f GFLOP/s\n", t, t > 1 ? "s" : "", fma_peak_gflops(t));
  }
  if (peak_only) return 0;

  std::vector<Library> libs;
  if (which == "both" || which == "dnnl") {
    libs.push_back({"oneDNN", dnnl_gemm, [](int n) { omp_set_num_threads(n); }});
    libs.push_back({"oneDNN heads over threads", dnnl_gemm_heads_parallel, [](int n) { omp_set_num_threads(n); }, true});
  }
#if TUTTI_BENCH_OPENBLAS
  if (which == "both" || which == "openblas")
    libs.push_back({"OpenBLAS", openblas_gemm, [](int n) { openblas_set_num_threads(n); }});
  std::printf("OpenBLAS: %s, core %s\n", openblas_get_config(), openblas_get_corename());
#else
  if (which == "openblas") throw std::runtime_error("built without OpenBLAS (see bench/CMakeLists.txt)");
  std::printf("OpenBLAS: not built in (libopenblas-dev was not found at configure time)\n");
#endif
  std::printf("oneDNN: %d.%d.%d\n", dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);

  const std::vector<Gemm> shapes = w2_shapes();
#if TUTTI_BENCH_OPENBLAS
  if (which == "both") {
    omp_set_num_threads(1), openblas_set_num_threads(1);
    double worst = 0.0;
    for (const Gemm& g : shapes) worst = std::max(worst, max_rel_diff(g, dnnl_gemm, openblas_gemm));
    std::printf("check: oneDNN vs OpenBLAS max relative difference %.2e\n", worst);
    if (worst > 1e-3) throw std::runtime_error("oneDNN and OpenBLAS disagree");
  }
#endif

  std::printf("\n| product | M x N x K | op | library | threads | GFLOP/s median | GFLOP/s best |\n");
  std::printf("|---|---|---|---|---:|---:|---:|\n");
  for (const Gemm& g : shapes) {
    Operands o = make_operands(g);
    char dims[64], op[8];
    std::snprintf(dims, sizeof dims, "%dx%dx%d", g.m, g.n, g.k);
    std::snprintf(op, sizeof op, "%s%s", g.trans_a ? "T" : "N", g.trans_b ? "T" : "N");
    for (int t : thread_counts) {
      for (const Library& lib : libs) {
        if (lib.batched_only && (g.batch == 1 || t == 1)) continue;
        // Each library gets exactly t threads and the other library's pool is left at one, so
        // no second pool competes for the cores.
        omp_set_num_threads(1);
#if TUTTI_BENCH_OPENBLAS
        openblas_set_num_threads(1);
#endif
        lib.set_threads(t);
        const Stats s = time_gemm(g, o, lib.run, reps);
        std::printf("| %s | %s | %s | %s | %d | %.1f | %.1f |\n", g.name.c_str(), dims, op, lib.name.c_str(), t,
                    s.median, s.best);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fp32 GEMM GFLOP/s, oneDNN vs OpenBLAS, on the W2 training shapes"};
  int reps = 20;
  std::string threads = "1,2", lib = "both";
  bool peak = false, peak_only = false;
  app.add_option("--reps", reps, "timed repetitions per shape (median and best are reported)")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "comma-separated thread counts");
  app.add_option("--lib", lib, "which library")->check(CLI::IsMember({"both", "dnnl", "openblas"}));
  app.add_flag("--peak", peak, "also measure the FMA peak at each thread count");
  app.add_flag("--peak-only", peak_only, "measure only the FMA peak");
  CLI11_PARSE(app, argc, argv);
  try {
    std::printf("command:");
    for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
    std::printf("\n");
    return run(reps, parse_threads(threads), lib, peak, peak_only);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gemm_bench: error: %s\n", e.what());
    return 1;
  }
}
