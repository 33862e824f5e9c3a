// Checks the CUDA build_tree kernel on the host, bit for bit against the CPU path: the kernel runs
// with one std::thread per CUDA thread (cuda_shim.h). Cases: random candidates with ties, -inf,
// NaN and missing tokens, both layouts, both modes. Usage: run.sh [seeds] [few|big].
#include <algorithm>
#include <cfloat>
#include <cstdio>
#include <random>
#include <string>
#include "kernel_gen.h"  // csrc/cuda/tree.cu's build_tree kernel, cut out by run.sh
#include "cpu_gen.h"     // csrc/tree.cpp's CPU path, cut out by run.sh
using namespace specx;

struct Bufs {
  std::vector<int64_t> tokens, parents, depths, paths, num_nodes;
  std::vector<float> scores;
  std::vector<int32_t> mask;
  void bind(BuildTreeParams& p) {
    const size_t rows = size_t(p.batch) * p.size;
    tokens.assign(rows, 111);
    parents.assign(rows, 111);
    depths.assign(rows, 111);
    scores.assign(rows, 111.f);
    mask.assign(rows * p.words, 111);
    paths.assign(rows * (p.depth + 1), 111);
    num_nodes.assign(p.batch, 111);
    p.tokens = tokens.data(); p.parents = parents.data(); p.depths = depths.data(); p.scores = scores.data();
    p.mask = mask.data(); p.paths = paths.data(); p.num_nodes = num_nodes.data();
  }
  bool operator==(const Bufs& o) const {
    return tokens == o.tokens && parents == o.parents && depths == o.depths && mask == o.mask && paths == o.paths &&
           num_nodes == o.num_nodes && std::memcmp(scores.data(), o.scores.data(), 4 * scores.size()) == 0;
  }
};

long g_max_syncs = 0;

void run_emu(const BuildTreeParams& p) {
  blockDim.x = kThreads;
  const size_t bytes = smem_layout(p).bytes;
  for (int64_t b = 0; b < p.batch; ++b) {
    BlockCtx ctx;
    ctx.bar = std::make_unique<std::barrier<>>(kThreads);
    for (int w = 0; w < kThreads / 32; ++w) ctx.wbar.push_back(std::make_unique<std::barrier<>>(32));
    ctx.xchg.assign(kThreads, 0);
    std::vector<unsigned char> smem(bytes + 64, 0xCD);
    ctx.smem = smem.data();
    std::vector<std::thread> th;
    for (int t = 0; t < kThreads; ++t)
      th.emplace_back([&, t] {
        g_ctx = &ctx;
        threadIdx.x = t;
        blockIdx.x = unsigned(b);
        build_tree_kernel(p);
      });
    for (auto& x : th) x.join();
    for (int i = 0; i < 64; ++i)
      if (smem[bytes + i] != 0xCD) { std::printf("smem overflow past layout\n"); std::exit(1); }
    g_max_syncs = std::max<long>(g_max_syncs, ctx.syncs.load());
  }
}

int main(int argc, char** argv) {
  const int seeds = argc > 1 ? std::atoi(argv[1]) : 1;
  const bool big = argc > 2 && std::string(argv[2]) == "big";
  std::mt19937 rng(12345);
  const float specials[] = {0.0f, -0.0f, -0.5f, -1.0f, -1.0f, -2.0f, 0.25f, INFINITY, -INFINITY, NAN,
                            -FLT_MAX, -1e38f, -3.0f, -0.5f};
  struct Cfg { int size, depth, k; };
  std::vector<Cfg> cfgs;
  if (argc > 2 && std::string(argv[2]) == "one") {
    cfgs = {{64, 8, 8}};
  } else if (argc > 2 && std::string(argv[2]) == "few") {
    cfgs = {{64, 8, 8}, {100, 4, 13}, {9, 3, 3}, {2, 3, 300}, {33, 5, 2}};
  } else if (big) {
    cfgs = {{1024, 8, 8}, {1024, 3, 8}, {513, 6, 16}, {2, 3, 8192}, {300, 5, 27}, {65, 10, 64}, {1024, 40, 1},
            {64, 8, 8}, {129, 8, 63}};
  } else {
    for (int size : {1, 2, 3, 5, 9, 16, 33, 64, 65, 100})
      for (int depth : {0, 1, 2, 3, 6})
        for (int k : {1, 2, 3, 5, 8, 13})
          cfgs.push_back({size, depth, k});
    cfgs.push_back({64, 8, 8});
    cfgs.push_back({40, 4, 0});
    cfgs.push_back({20, 30, 1});
  }
  int fails = 0, runs = 0;
  for (int seed = 0; seed < seeds; ++seed)
    for (const Cfg& c : cfgs)
      for (int per_parent = 0; per_parent < 2; ++per_parent)
        for (int dist = 0; dist < 3; ++dist)
          for (int mode = 0; mode < 2; ++mode) {
            if (mode == 0 && (c.size != 64 || dist == 2)) continue;  // backbone: a few
            const int batch = 2;
            const size_t per = size_t(c.depth) * c.k * (per_parent ? c.k : 1);
            std::vector<int64_t> tok(batch * per), root(batch);
            std::vector<float> lp(batch * per);
            std::uniform_real_distribution<float> u(0.0f, 1.0f);
            for (size_t i = 0; i < tok.size(); ++i) {
              tok[i] = rng() % 1000;
              if (dist == 0) {
                lp[i] = std::log(u(rng));
                if (u(rng) < 0.1f) { lp[i] = -INFINITY; if (u(rng) < 0.5f) tok[i] = -1; }
              } else if (dist == 1) {
                lp[i] = specials[rng() % (sizeof(specials) / sizeof(float))];
                if (u(rng) < 0.05f) tok[i] = -1;
              } else {
                lp[i] = (rng() % 4 == 0) ? -1.0f : 0.0f;
              }
            }
            for (int b = 0; b < batch; ++b) root[b] = 7000 + b;
            BuildTreeParams p{};
            p.cand_tokens = tok.data(); p.cand_log_probs = lp.data(); p.root_tokens = root.data();
            p.batch = batch; p.depth = c.depth; p.k = c.k; p.per_parent = per_parent;
            p.mode = mode ? TreeMode::kTopkExpand : TreeMode::kBackbone;
            p.size = mode ? c.size : 1 + c.depth * c.k;
            p.words = (p.size + 31) / 32;
            Bufs ref, got;
            ref.bind(p);
            for (int64_t b = 0; b < batch; ++b) cpuref::build_tree_row(p, b);
            got.bind(p);
            run_emu(p);
            ++runs;
            if (!(ref == got)) {
              ++fails;
              std::printf("MISMATCH size %d depth %d k %d per_parent %d dist %d mode %d seed %d\n", p.size, c.depth,
                          c.k, per_parent, dist, mode, seed);
              for (int64_t b = 0; b < batch; ++b) {
                std::printf(" b%ld n ref %ld got %ld\n", b, ref.num_nodes[b], got.num_nodes[b]);
                for (int i = 0; i < std::min(p.size, 12); ++i)
                  std::printf("  %d: ref (%ld,%ld,%g) got (%ld,%ld,%g)\n", i, ref.tokens[b * p.size + i],
                              ref.parents[b * p.size + i], ref.scores[b * p.size + i], got.tokens[b * p.size + i],
                              got.parents[b * p.size + i], got.scores[b * p.size + i]);
              }
              if (fails > 3) return 1;
            }
          }
  std::printf("%d runs, %d mismatches, max barriers per block %ld\n", runs, fails, g_max_syncs);
  return fails != 0;
}
