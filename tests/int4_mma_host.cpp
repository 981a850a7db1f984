// Host build of qvlq.int4_mma.SOURCE for the tests: the kernel body exactly as written, one std::thread per
// CUDA thread, its PTX helpers replaced by C++ with the semantics the PTX ISA gives them (mma: a warp-wide
// exchange of fragments through shared state, the fragment layout of mma.m16n8k16). What this checks on a
// machine without a GPU: the kernel's own indexing (tiles, chunks, steps per warp, groups, x offsets, the
// shared-memory reduction, bias, output) against the Python packing. What it cannot: that the PTX layout
// assumed here (and in int4_mma.emulate) is the hardware's; the GPU tests check that.
//
// Build: g++ -std=c++20 -O1 -pthread -I<dir with kernel.cu> -DQVLQ_BF16=0|1 <int4_mma.defines as -D> this.cpp
// Run:   ./a.out <dir> N K G M has_bias [ldx]   (reads qw.bin meta.bin x.bin [bias.bin], writes y.bin;
//        x.bin holds M rows of ldx values, default K; with GLU, y.bin holds N/2 outputs a row; NORM reads
//        gamma.bin (K values) and eps, the 8th argument; RESID reads resid.bin, M rows of the outputs)
//        ./a.out dequant <dir> N K G out_f32       (qvlq_int4_dequant: reads qw.bin meta.bin, writes w.bin)
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#define QVLQ_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  // one instance: blocks run one after another

struct Dim { int x = 0, y = 0, z = 0; };
thread_local Dim threadIdx, blockIdx;
static Dim blockDim;
static std::barrier<>* block_barrier;
static void __syncthreads() { block_barrier->arrive_and_wait(); }

static float as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }  // bf16 below
static unsigned int and_or(unsigned int a, unsigned int b, unsigned int c) { return (a & b) | c; }
#if QVLQ_BF16
static float h2f(unsigned int h) { return as_float((h & 0xFFFFu) << 16); }
static unsigned short f2h(float f) {  // round to nearest even (finite values)
  unsigned int u; std::memcpy(&u, &f, 4);
  return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#else
static float h2f(unsigned int h) { unsigned short s = h & 0xFFFFu; _Float16 v; std::memcpy(&v, &s, 2); return (float)v; }
static unsigned short f2h(float f) { _Float16 v = (_Float16)f; unsigned short s; std::memcpy(&s, &v, 2); return s; }
#endif
static float fp16_to_float(unsigned int h) { unsigned short s = h & 0xFFFFu; _Float16 v; std::memcpy(&v, &s, 2); return (float)v; }
static unsigned int fma2(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int lo = f2h(h2f(a) * h2f(b) + h2f(c)), hi = f2h(h2f(a >> 16) * h2f(b >> 16) + h2f(c >> 16));
  return lo | (hi << 16);
}
static unsigned short to_half(float v) { return f2h(v); }
static float rsqrt_(float v) { return 1.f / std::sqrt(v); }
static float act_to_float(unsigned int h) { return h2f(h); }

struct Warp {
  std::barrier<>* bar;
  unsigned int a[2][32][4], b[2][32][2];
  float c[2][32][4];
};
static Warp* warps;

static void mma(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
  const int lane = threadIdx.x & 31;
  Warp& w = warps[threadIdx.x >> 5];
  thread_local int calls = 0;
  // two exchange buffers by call parity (every lane of a warp makes the same calls): a lane may deposit
  // the next mma while others still read this one, and cannot pass the next barrier before they are done
  const int q = calls++ & 1;
  std::memcpy(w.a[q][lane], a, 16);
  w.b[q][lane][0] = b0;
  w.b[q][lane][1] = b1;
  std::memcpy(w.c[q][lane], d, 16);
  w.bar->arrive_and_wait();
  if (lane == 0) {
    float A[16][16], B[16][8], D[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + h] = h2f(w.a[q][l][r] >> (16 * h));
      for (int r = 0; r < 2; ++r)
        for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = h2f(w.b[q][l][r] >> (16 * h));
      for (int i = 0; i < 4; ++i) D[g + 8 * (i >> 1)][2 * t + (i & 1)] = w.c[q][l][i];
    }
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 8; ++n)
        for (int k = 0; k < 16; ++k) D[r][n] += A[r][k] * B[k][n];
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) w.c[q][l][i] = D[(l >> 2) + 8 * (i >> 1)][2 * (l & 3) + (i & 1)];
  }
  w.bar->arrive_and_wait();
  std::memcpy(d, w.c[q][lane], 16);
}

// cp.async as the PTX ISA defines it: a copy lands at some point before the wait_group that covers its
// commit group. Here it lands exactly there (deferred memcpy), so a read of a slot before its wait, or of
// another lane's copy before sync_warp, sees stale data (the other lane's thread may not have waited yet).
struct Copy { void* dst; const void* src; int bytes; };
thread_local std::vector<Copy> pending;
thread_local std::deque<std::vector<Copy>> groups;
static void cp_async16(void* dst, const void* src) { pending.push_back({dst, src, 16}); }
static void cp_async8(void* dst, const void* src) { pending.push_back({dst, src, 8}); }
static void cp_async_commit() { groups.push_back(std::move(pending)); pending.clear(); }
template <int N> static void cp_async_wait() {
  for (; (int)groups.size() > N; groups.pop_front())
    for (const Copy& c : groups.front()) std::memcpy(c.dst, c.src, c.bytes);
}
static void sync_warp() { warps[threadIdx.x >> 5].bar->arrive_and_wait(); }

#include "kernel.cu"

template <class T>
static std::vector<T> load(const std::string& path, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)(n * sizeof(T)));
  if (!f) { std::fprintf(stderr, "short read: %s\n", path.c_str()); std::exit(2); }
  return v;
}

// qvlq_int4_dequant: one call per CUDA thread, in order (it has no barriers). W [N, K] -> w.bin.
static int run_dequant(int argc, char** argv) {
  if (argc != 7) { std::fprintf(stderr, "usage: %s dequant dir N K G out_f32\n", argv[0]); return 2; }
  const std::string dir = argv[2];
  const int N = std::atoi(argv[3]), K = std::atoi(argv[4]), G = std::atoi(argv[5]), out_f32 = std::atoi(argv[6]);
  auto qw = load<unsigned int>(dir + "/qw.bin", (size_t)N / 16 * K / 64 * 128);
  auto meta = load<u2>(dir + "/meta.bin", (size_t)N / 16 * G * 8);
  std::vector<unsigned char> w((size_t)N * K * (out_f32 ? 4 : 2), 0xFF);
  const long long words = (long long)qw.size();
  blockDim.x = 256;
  for (long long i = 0; i < (words + 255) / 256 * 256; ++i) {  // the grid's tail threads return at once
    blockIdx.x = (int)(i / 256);
    threadIdx.x = (int)(i % 256);
    qvlq_int4_dequant(qw.data(), meta.data(), w.data(), K, G, words, out_f32);
  }
  std::ofstream(dir + "/w.bin", std::ios::binary).write(reinterpret_cast<const char*>(w.data()), (std::streamsize)w.size());
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "dequant") return run_dequant(argc, argv);
  if (argc < 7 || argc > 9) { std::fprintf(stderr, "usage: %s dir N K G M has_bias [ldx [eps]]\n", argv[0]); return 2; }
  const std::string dir = argv[1];
  const int N = std::atoi(argv[2]), K = std::atoi(argv[3]), G = std::atoi(argv[4]), M = std::atoi(argv[5]);
  const bool has_bias = std::atoi(argv[6]) != 0;
  const int ldx = argc >= 8 ? std::atoi(argv[7]) : K;
  const float eps = argc == 9 ? (float)std::atof(argv[8]) : 0.f;
  auto qw = load<u4>(dir + "/qw.bin", (size_t)N / 16 * K / 64 * 32);
  auto meta = load<u2>(dir + "/meta.bin", (size_t)N / 16 * G * 8);
  auto x = load<unsigned short>(dir + "/x.bin", (size_t)M * ldx);
  std::vector<float> bias = has_bias ? load<float>(dir + "/bias.bin", N) : std::vector<float>();
  const int n_out = GLU ? N / 2 : N;
  std::vector<unsigned short> y((size_t)M * n_out, 0xFFFF);
  std::vector<unsigned short> gamma = NORM ? load<unsigned short>(dir + "/gamma.bin", K) : std::vector<unsigned short>(8);
  std::vector<unsigned short> resid = RESID ? load<unsigned short>(dir + "/resid.bin", (size_t)M * n_out)
                                            : std::vector<unsigned short>(8);
  std::vector<Warp> ws(WARPS);
  for (auto& w : ws) w.bar = new std::barrier<>(32);
  warps = ws.data();
  block_barrier = new std::barrier<>(WARPS * 32);
  // one std::thread per CUDA thread of a block; the blocks run one after another on the same threads
  std::vector<std::thread> threads;
  for (int t = 0; t < WARPS * 32; ++t)
    threads.emplace_back([&, t] {
      threadIdx.x = t;
      for (int by = 0; by < M; ++by)
        for (int bx = 0; bx < n_out / 16 / TN; ++bx) {
          blockIdx.x = bx;
          blockIdx.y = by;
          qvlq_int4_mma(qw.data(), meta.data(), x.data(), has_bias ? bias.data() : nullptr, y.data(), K, G, ldx, n_out, 0u, n_out / 16,
                        gamma.data(), eps, resid.data(), n_out);
          block_barrier->arrive_and_wait();  // the block is done with its __shared__ before the next starts
        }
    });
  for (auto& th : threads) th.join();
  std::ofstream(dir + "/y.bin", std::ios::binary).write(reinterpret_cast<const char*>(y.data()), (std::streamsize)(y.size() * 2));
  return 0;
}
