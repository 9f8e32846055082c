// Runs `kernels.cu` on the CPU, for the tests of a machine without a GPU: each thread of a
// block is an OS thread (blocks one after another), `__shfl_xor_sync` exchanges values
// through the warp's slots between two barriers, `__half` and `__nv_bfloat16` convert with
// round-to-nearest-even. Enough CUDA for tuneforge's kernels, not a general emulator.
//
// `main` reads a call from its arguments and buffers from files:
//   emulate KERNEL GRID_X BLOCK_X BLOCK_Y DIR ARG...
// with ARG one of `in:I` / `out:I` (buffer I, the bytes of DIR/I.bin, written back to
// DIR/I.bin after the run), `null`, `i32:V`, `i64:V`, `u64:V`, `f64:V`.

#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

using std::erf;
using std::exp;
using std::log;
using std::sqrt;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 blockDim, gridDim;
inline thread_local dim3 threadIdx, blockIdx;

struct EmuWarp {
    explicit EmuWarp(std::ptrdiff_t n) : bar(n) {}
    std::barrier<> bar;
    double slot[32] = {};
};
inline thread_local EmuWarp* emu_warp = nullptr;

template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) {
    unsigned lane = threadIdx.x % 32;
    emu_warp->slot[lane] = (double)v;
    emu_warp->bar.arrive_and_wait();
    T r = (T)emu_warp->slot[lane ^ mask];
    emu_warp->bar.arrive_and_wait();
    return r;
}

// Threads of a block run at once, so atomics are real ones.
template <typename A> A atomicAdd(A* p, A v) { return std::atomic_ref<A>(*p).fetch_add(v); }

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h) {
    uint32_t s = (h.bits >> 15) & 1, e = (h.bits >> 10) & 31, m = h.bits & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline __half __float2half(float f) {
    // Through the nearest representable value (exact for the tests' magnitudes).
    float a = std::fabs(f);
    uint16_t s = std::signbit(f) ? 0x8000 : 0;
    if (std::isnan(f)) return {0x7e00};
    if (a >= 65520.0f) return {(uint16_t)(s | 0x7c00)};
    int e;
    std::frexp(a, &e);  // a = m · 2^e, m in [0.5, 1)
    int exp_bits = e + 14;
    if (exp_bits <= 0) return {(uint16_t)(s | (uint16_t)std::nearbyint(std::ldexp(a, 24)))};
    uint32_t q = (uint32_t)std::nearbyint(std::ldexp(a, 11 - e));  // 11 significant bits
    if (q == 2048) { q = 1024; exp_bits++; }
    return {(uint16_t)(s | (exp_bits << 10) | (q & 1023))};
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fc0};
    u += 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

// ------------------------------------------------------------------ launching

template <typename... P> struct EmuKernel {
    void (*f)(P...);
};

struct EmuArgs {
    std::vector<std::string> specs;
    std::vector<std::vector<unsigned char>>* buffers;
    size_t at = 0;

    const std::string& next() {
        if (at >= specs.size()) {
            std::fprintf(stderr, "too few arguments\n");
            std::exit(2);
        }
        return specs[at++];
    }
    template <typename P> P take() {
        std::string s = next();
        std::string kind = s.substr(0, s.find(':')), value = s.substr(s.find(':') + 1);
        if constexpr (std::is_pointer_v<P>) {
            if (s == "null") return nullptr;
            return (P)(void*)(*buffers)[std::stoul(value)].data();
        } else if constexpr (std::is_floating_point_v<P>) {
            return (P)std::stod(value);
        } else if constexpr (std::is_unsigned_v<P>) {
            return (P)std::stoull(value);
        } else {
            return (P)std::stoll(value);
        }
    }
};

template <typename... P> void emu_launch(void (*f)(P...), dim3 grid, dim3 block, EmuArgs& args) {
    std::tuple<P...> values{args.template take<P>()...};
    blockDim = block;
    gridDim = grid;
    unsigned threads = block.x * block.y;
    for (unsigned bx = 0; bx < grid.x; bx++) {
        std::vector<std::unique_ptr<EmuWarp>> warps;
        for (unsigned w = 0; w < (threads + 31) / 32; w++) warps.push_back(std::make_unique<EmuWarp>(std::min(32u, threads - w * 32)));
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; t++) {
            pool.emplace_back([&, t] {
                blockIdx = {bx, 0, 0};
                threadIdx = {t % block.x, t / block.x, 0};
                emu_warp = warps[t / 32].get();
                std::apply(f, values);
                emu_warp->bar.arrive_and_drop();
            });
        }
        for (auto& th : pool) th.join();
    }
}
