// Multi-level ROIAlign: torchvision LevelMapper fused with roi_align(aligned=False), one launch
// for all RoIs of all images and all four FPN levels.
//
// Compile-time constants (-D): ROI_OUT (pooled size, 7), ROI_SAMPLING (sampling ratio, 2; the
// adaptive ratio 0 is not supported), ROI_CPB (channels a block works on at once), ROI_CH
// (channels of one block; grid.y = ceil(C / ROI_CH)).
//
// Features are [B, C, H_l, W_l] canvas-sized maps.  Image b only owns the top-left
// (padded_h / stride, padded_w / stride) of each map, padded = resized size rounded up to
// size_divisible (torchvision batch_images), and sampling clamps at that extent exactly as
// torchvision's kernel clamps at the border of a single-image tensor: nothing outside is read.
//
// Work layout: block = one RoI x ROI_CH channels, thread = one output bin of ROI_CPB channels at
// a time; the bilinear taps of the thread's bin are computed once and reused for every channel.
// With ROI_WIN > 0 the RoI's window of the map is staged in shared memory first (see below);
// that path is correct (tested) but measured 7x slower on the H100, so the Python side builds
// with ROI_WIN = 0 (direct reads) by default until it is understood (docs/gpu_kernels.md).
// Blocks run RoI-fastest, so at any time the chip works on the same few channels of the same
// image: those planes stay in L2 while the RoIs of that image read them.
//
// The sample coordinates use __f*_rn intrinsics: no FMA contraction, so they round like
// torchvision's CPU kernel and the NumPy reference (an FMA moves a coordinate near x = 300 by one
// ulp, 3e-5, enough to break a 1e-5 comparison).  The weighted sum may use FMA.
#include "common.cuh"

#ifndef ROI_OUT
#define ROI_OUT 7
#endif
#ifndef ROI_SAMPLING
#define ROI_SAMPLING 2
#endif
#ifndef ROI_CPB
#define ROI_CPB 5
#endif
#ifndef ROI_CH
#define ROI_CH 64
#endif
#ifndef ROI_WIN
#define ROI_WIN 1024  // floats of one channel's window in shared memory (2 x 20 KB for 5 channels)
#endif

#define ROI_WIN_ALLOC (ROI_WIN > 0 ? ROI_WIN : 1)  // ROI_WIN = 0: never stage (direct reads only)
#define ROI_BINS (ROI_OUT * ROI_OUT)
#define ROI_TAPS (ROI_SAMPLING * ROI_SAMPLING * 4)

// 4-byte global -> shared copies that hold no register while in flight (cp.async, sm_80+).
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void async_copy4(float* dst, const float* src) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src) : "memory");
}
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
#else
__device__ __forceinline__ void async_copy4(float* dst, const float* src) { *dst = __ldg(src); }
__device__ __forceinline__ void async_commit() {}
__device__ __forceinline__ void async_wait_all_but_one() {}
__device__ __forceinline__ void async_wait_all() {}
#endif

struct AxisTap {
    int lo, hi;
    float wlo, whi;
};

// torchvision bilinear_interpolate along one axis, as reference/roi_align.py _axis_samples.
__device__ __forceinline__ AxisTap axis_tap(float coord, int extent) {
    AxisTap a;
    const bool valid = !(coord < -1.f || coord > (float)extent);
    float c = fmaxf(coord, 0.f);
    a.lo = (int)c;
    if (a.lo >= extent - 1) {
        a.lo = a.hi = extent - 1;
        c = (float)a.lo;
    } else {
        a.hi = a.lo + 1;
    }
    a.whi = __fsub_rn(c, (float)a.lo);
    a.wlo = __fsub_rn(1.f, a.whi);
    if (!valid) a.wlo = a.whi = 0.f;  // torchvision: a sample outside [-1, extent] contributes 0
    return a;
}

extern "C" __global__ void __launch_bounds__(ROI_BINS * ROI_CPB, 3)  // 3 blocks per SM: <= 80 registers
multilevel_roi_align(const float* __restrict__ f0, const float* __restrict__ f1, const float* __restrict__ f2,
                     const float* __restrict__ f3, int h0, int w0, int h1, int w1, int h2, int w2, int h3, int w3,
                     const float4* __restrict__ rois, const int* __restrict__ roi_img,
                     const int* __restrict__ num_rois, const float* __restrict__ image_sizes, int C,
                     int size_divisible, int k_min, float canonical_scale, float canonical_level, float eps,
                     float* __restrict__ out) {
    const int r = blockIdx.x;
    if (r >= *num_rois) return;
    const int bin = threadIdx.x % ROI_BINS, csub = threadIdx.x / ROI_BINS;
    const int ph = bin / ROI_OUT, pw = bin % ROI_OUT;
    const float4 roi = rois[r];
    const int b = roi_img[r];

    // torchvision LevelMapper: floor(lvl0 + log2(sqrt(area) / s0) + eps), clamped to [k_min, k_min + 3].
    const float area = __fmul_rn(__fsub_rn(roi.z, roi.x), __fsub_rn(roi.w, roi.y));
    float lvl = floorf(__fadd_rn(__fadd_rn(canonical_level, log2f(__fdiv_rn(sqrtf(area), canonical_scale))), eps));
    lvl = fminf(fmaxf(lvl, (float)k_min), (float)(k_min + 3));
    const int level = (int)lvl - k_min;
    const float* feat;
    int H, W;
    switch (level) {
        case 0: feat = f0; H = h0; W = w0; break;
        case 1: feat = f1; H = h1; W = w1; break;
        case 2: feat = f2; H = h2; W = w2; break;
        default: feat = f3; H = h3; W = w3; break;
    }
    const int stride = 1 << (k_min + level);
    const float scale = 1.f / (float)stride;  // a power of two: exact
    // valid extent of image b on this level: its padded size / stride (settings.padded_extent)
    const int pad_h = ((int)image_sizes[2 * b] + size_divisible - 1) / size_divisible * size_divisible;
    const int pad_w = ((int)image_sizes[2 * b + 1] + size_divisible - 1) / size_divisible * size_divisible;
    const int eh = min(pad_h / stride, H), ew = min(pad_w / stride, W);

    const float x1 = __fmul_rn(roi.x, scale), y1 = __fmul_rn(roi.y, scale);
    const float rw = fmaxf(__fsub_rn(__fmul_rn(roi.z, scale), x1), 1.f);
    const float rh = fmaxf(__fsub_rn(__fmul_rn(roi.w, scale), y1), 1.f);
    const float bw = __fdiv_rn(rw, (float)ROI_OUT), bh = __fdiv_rn(rh, (float)ROI_OUT);
    // start + p * bin + (i + .5) * bin / grid, left to right as torchvision
    auto coord = [](float start, float bin, int p, int i) {
        return __fadd_rn(__fadd_rn(start, __fmul_rn((float)p, bin)),
                         __fdiv_rn(__fmul_rn((float)i + 0.5f, bin), (float)ROI_SAMPLING));
    };
    const bool empty = eh <= 0 || ew <= 0;

    // The taps of the whole RoI lie in a window [wy0, wy0 + wh) x [wx0, wx0 + ww) of the map: taps
    // grow with the sample coordinate, so the first and last samples bound it.  When the window of
    // ROI_CPB channels fits in shared memory, the block stages it there with coalesced row reads
    // and interpolates from it: each feature value is read from L1/L2 once per (RoI, channel)
    // instead of once per tap.  Larger windows (long thin RoIs) read the taps directly.
    int wy0 = 0, wx0 = 0, wh = 0, ww = 0;
    if (!empty) {
        const AxisTap ya = axis_tap(coord(y1, bh, 0, 0), eh), yz = axis_tap(coord(y1, bh, ROI_OUT - 1, ROI_SAMPLING - 1), eh);
        const AxisTap xa = axis_tap(coord(x1, bw, 0, 0), ew), xz = axis_tap(coord(x1, bw, ROI_OUT - 1, ROI_SAMPLING - 1), ew);
        wy0 = ya.lo;
        wh = yz.hi - ya.lo + 1;
        wx0 = xa.lo;
        ww = xz.hi - xa.lo + 1;
    }
    const bool staged = !empty && wh * ww <= ROI_WIN;
    const int pitch = staged ? ww : W;
    const int oy = staged ? wy0 : 0, ox = staged ? wx0 : 0;

    int off[ROI_TAPS];
    float wt[ROI_TAPS];
#pragma unroll
    for (int iy = 0; iy < ROI_SAMPLING; ++iy) {
        const AxisTap ty = axis_tap(coord(y1, bh, ph, iy), eh);
#pragma unroll
        for (int ix = 0; ix < ROI_SAMPLING; ++ix) {
            const AxisTap tx = axis_tap(coord(x1, bw, pw, ix), ew);
            const int q = (iy * ROI_SAMPLING + ix) * 4;
            off[q + 0] = (ty.lo - oy) * pitch + (tx.lo - ox);
            off[q + 1] = (ty.lo - oy) * pitch + (tx.hi - ox);
            off[q + 2] = (ty.hi - oy) * pitch + (tx.lo - ox);
            off[q + 3] = (ty.hi - oy) * pitch + (tx.hi - ox);
            wt[q + 0] = __fmul_rn(ty.wlo, tx.wlo);
            wt[q + 1] = __fmul_rn(ty.wlo, tx.whi);
            wt[q + 2] = __fmul_rn(ty.whi, tx.wlo);
            wt[q + 3] = __fmul_rn(ty.whi, tx.whi);
            if (empty) {
#pragma unroll
                for (int z = 0; z < 4; ++z) {
                    off[q + z] = 0;
                    wt[q + z] = 0.f;
                }
            }
        }
    }

    const size_t plane = (size_t)H * W;
    const int c_begin = blockIdx.y * ROI_CH, c_end = min(C, c_begin + ROI_CH);
    const float inv_count = 1.f / (float)(ROI_SAMPLING * ROI_SAMPLING);  // 1/4: exact
    if (staged) {
        // Double buffer: the window of the next ROI_CPB channels is copied (cp.async, no
        // registers held) while the current one is interpolated.
        __shared__ float win[2][ROI_CPB * ROI_WIN_ALLOC];
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, full_warps = blockDim.x >> 5;
        auto stage = [&](int cb, float* buf) {
            const int nc = min(ROI_CPB, c_end - cb);
            if (warp < full_warps) {
                for (int row = warp; row < nc * wh; row += full_warps) {
                    const int cl = row / wh, yy = row - cl * wh;
                    const float* src = feat + ((size_t)b * C + cb + cl) * plane + (size_t)(wy0 + yy) * W + wx0;
                    float* dst = buf + cl * ROI_WIN_ALLOC + yy * ww;
                    for (int xx = lane; xx < ww; xx += 32) async_copy4(dst + xx, src + xx);
                }
            }
            async_commit();
        };
        stage(c_begin, win[0]);
        int slot = 0;
        for (int cb = c_begin; cb < c_end; cb += ROI_CPB, slot ^= 1) {
            const bool more = cb + ROI_CPB < c_end;
            if (more) {
                stage(cb + ROI_CPB, win[slot ^ 1]);
                async_wait_all_but_one();
            } else {
                async_wait_all();
            }
            __syncthreads();  // this chunk's window is complete for every thread
            if (csub < min(ROI_CPB, c_end - cb)) {
                const float* w = win[slot] + csub * ROI_WIN_ALLOC;
                float acc = 0.f;
#pragma unroll
                for (int q = 0; q < ROI_TAPS; ++q) acc += wt[q] * w[off[q]];
                out[((size_t)r * C + cb + csub) * ROI_BINS + bin] = acc * inv_count;
            }
            __syncthreads();  // reads of this slot are done before it is staged again
        }
    } else {
        for (int c = c_begin + csub; c < c_end; c += ROI_CPB) {
            const float* p = feat + ((size_t)b * C + c) * plane;
            float acc = 0.f;
#pragma unroll
            for (int q = 0; q < ROI_TAPS; ++q) acc += wt[q] * __ldg(p + off[q]);
            out[((size_t)r * C + c) * ROI_BINS + bin] = acc * inv_count;
        }
    }
}
