// Multi-level ROIAlign on channels-last maps: torchvision LevelMapper fused with
// roi_align(aligned=False), one launch for all RoIs of all images and all pooled maps (up to
// ROI_MAX_LEVELS, each with its own stride: DetectorSettings.roi_strides).
//
// Layouts (channels last, the contract of python_backend/names.py):
//   features  [B, H_l, W_l, C] per level (canvas-sized), float32 or float16 (ROI_HALF)
//   out       [R, ROI_OUT, ROI_OUT, C]  (the header's fc6 weights are permuted to match)
// Why channels last: a warp's threads take consecutive channels, so each of the 16 bilinear taps
// of a bin is one coalesced 128-byte read and each output row one coalesced write.  The NCHW
// version (one thread per bin, taps scattered over a plane) was bound by L1 wavefronts, as
// Nsight Compute showed (the profiles are in docs/gpu_kernels.md).
//
// Image b only owns the top-left (padded_h / stride, padded_w / stride) of each map, padded =
// resized size rounded up to size_divisible (torchvision batch_images); sampling clamps at that
// extent exactly as torchvision clamps at the border of a single-image tensor.
//
// Block = one RoI: ROI_CT threads along channels x ROI_BT along bins.  The 2 * ROI_OUT * ROI_SAMPLING
// per-axis sample taps are computed once per block into shared memory.  Sample coordinates use
// __f*_rn intrinsics (no FMA), so they round like torchvision's CPU kernel and the NumPy reference.
#include "common.cuh"

#ifndef ROI_OUT
#define ROI_OUT 7
#endif
#ifndef ROI_SAMPLING
#define ROI_SAMPLING 2
#endif
#ifndef ROI_CT
#define ROI_CT 32
#endif
#ifndef ROI_BT
#define ROI_BT 4
#endif
#ifndef ROI_MINB
#define ROI_MINB 1  // __launch_bounds__ min blocks per SM: trades registers for occupancy
#endif

#define ROI_AXIS (ROI_OUT * ROI_SAMPLING)
#define ROI_MAX_LEVELS 6  // python_backend/cuda/roi_align.py MAX_LEVELS: the pointer arguments f0..f5

// The maps' element type: float32, or float16 with -DROI_HALF (the fp16 rpn's maps: half the bytes
// gathered).  A float16 value converts to float32 exactly, so pooling float16 maps gives the
// bits that pooling the same maps cast to float32 gives; the sums stay float32 either way.
#ifdef ROI_HALF
typedef unsigned short feat_t;  // IEEE binary16 bits (no cuda_fp16.h needed under NVRTC)
__device__ __forceinline__ float load_feat(const feat_t* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(__ldg(p)));
    return f;
}
#else
typedef float feat_t;
__device__ __forceinline__ float load_feat(const feat_t* p) { return __ldg(p); }
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

// start + p * bin + (i + .5) * bin / grid, left to right as torchvision
__device__ __forceinline__ float sample_coord(float start, float bin, int p, int i) {
    return __fadd_rn(__fadd_rn(start, __fmul_rn((float)p, bin)),
                     __fdiv_rn(__fmul_rn((float)i + 0.5f, bin), (float)ROI_SAMPLING));
}

extern "C" __global__ void __launch_bounds__(ROI_CT * ROI_BT, ROI_MINB)
multilevel_roi_align(const feat_t* __restrict__ f0, const feat_t* __restrict__ f1, const feat_t* __restrict__ f2,
                     const feat_t* __restrict__ f3, const feat_t* __restrict__ f4, const feat_t* __restrict__ f5,
                     int h0, int w0, int h1, int w1, int h2, int w2, int h3, int w3, int h4, int w4, int h5, int w5,
                     int s0, int s1, int s2, int s3, int s4, int s5, int num_levels, int k_max,
                     const float4* __restrict__ rois, const int* __restrict__ roi_img,
                     const int* __restrict__ num_rois, const float* __restrict__ image_sizes, int C,
                     int size_divisible, int k_min, float canonical_scale, float canonical_level, float eps,
                     float* __restrict__ out) {
    __shared__ AxisTap ytaps[ROI_AXIS], xtaps[ROI_AXIS];
    __shared__ const feat_t* s_feat;
    __shared__ int s_w, s_empty;
    const int r = blockIdx.x;
    if (r >= *num_rois) return;
    const int tid = threadIdx.y * ROI_CT + threadIdx.x;

    if (tid == 0) {
        const float4 roi = rois[r];
        const int b = roi_img[r];
        // torchvision LevelMapper: floor(lvl0 + log2(sqrt(area) / s0) + eps), clamped to [k_min, k_max];
        // the index level - k_min picks a map, whose own stride scales the RoI (MultiScaleRoIAlign)
        const float area = __fmul_rn(__fsub_rn(roi.z, roi.x), __fsub_rn(roi.w, roi.y));
        float lvl = floorf(__fadd_rn(__fadd_rn(canonical_level, log2f(__fdiv_rn(sqrtf(area), canonical_scale))), eps));
        lvl = fminf(fmaxf(lvl, (float)k_min), (float)k_max);
        const int level = (int)lvl - k_min;
        const feat_t* feat = f0;
        int H = 0, W = 1, stride = 1;
        switch (level) {
            case 0: feat = f0; H = h0; W = w0; stride = s0; break;
            case 1: feat = f1; H = h1; W = w1; stride = s1; break;
            case 2: feat = f2; H = h2; W = w2; stride = s2; break;
            case 3: feat = f3; H = h3; W = w3; stride = s3; break;
            case 4: feat = f4; H = h4; W = w4; stride = s4; break;
            case 5: feat = f5; H = h5; W = w5; stride = s5; break;
            default: break;
        }
        // valid extent of image b on this map: ceil(padded size / stride) (settings.level_grid)
        const int pad_h = ((int)image_sizes[2 * b] + size_divisible - 1) / size_divisible * size_divisible;
        const int pad_w = ((int)image_sizes[2 * b + 1] + size_divisible - 1) / size_divisible * size_divisible;
        const int eh = min((pad_h + stride - 1) / stride, H), ew = min((pad_w + stride - 1) / stride, W);
        s_feat = feat + (size_t)b * H * W * C;
        s_w = W;
        // no map at this index (strides with gaps): torchvision leaves the row zero
        s_empty = level >= num_levels || eh <= 0 || ew <= 0;
        if (!s_empty) {
            const float scale = 1.f / (float)stride;  // a power of two: exact
            const float x1 = __fmul_rn(roi.x, scale), y1 = __fmul_rn(roi.y, scale);
            const float rw = fmaxf(__fsub_rn(__fmul_rn(roi.z, scale), x1), 1.f);
            const float rh = fmaxf(__fsub_rn(__fmul_rn(roi.w, scale), y1), 1.f);
            const float bw = __fdiv_rn(rw, (float)ROI_OUT), bh = __fdiv_rn(rh, (float)ROI_OUT);
            for (int i = 0; i < ROI_AXIS; ++i) {
                ytaps[i] = axis_tap(sample_coord(y1, bh, i / ROI_SAMPLING, i % ROI_SAMPLING), eh);
                xtaps[i] = axis_tap(sample_coord(x1, bw, i / ROI_SAMPLING, i % ROI_SAMPLING), ew);
            }
        }
    }
    __syncthreads();

    float* dst = out + (size_t)r * ROI_OUT * ROI_OUT * C;
    if (s_empty) {  // torchvision reads nothing from an empty tensor: zeros
        for (int i = tid; i < ROI_OUT * ROI_OUT * C; i += ROI_CT * ROI_BT) dst[i] = 0.f;
        return;
    }
    const feat_t* feat = s_feat;
    const int W = s_w;
    const float inv_count = 1.f / (float)(ROI_SAMPLING * ROI_SAMPLING);
    for (int bin = threadIdx.y; bin < ROI_OUT * ROI_OUT; bin += ROI_BT) {
        const int ph = bin / ROI_OUT, pw = bin % ROI_OUT;
        for (int c = threadIdx.x; c < C; c += ROI_CT) {
            float acc = 0.f;
#pragma unroll
            for (int iy = 0; iy < ROI_SAMPLING; ++iy) {
                const AxisTap ty = ytaps[ph * ROI_SAMPLING + iy];
#pragma unroll
                for (int ix = 0; ix < ROI_SAMPLING; ++ix) {
                    const AxisTap tx = xtaps[pw * ROI_SAMPLING + ix];
                    const float v1 = load_feat(feat + ((size_t)ty.lo * W + tx.lo) * C + c);
                    const float v2 = load_feat(feat + ((size_t)ty.lo * W + tx.hi) * C + c);
                    const float v3 = load_feat(feat + ((size_t)ty.hi * W + tx.lo) * C + c);
                    const float v4 = load_feat(feat + ((size_t)ty.hi * W + tx.hi) * C + c);
                    // torchvision: w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, w1 = hy * hx ...
                    acc += ty.wlo * tx.wlo * v1 + ty.wlo * tx.whi * v2 + ty.whi * tx.wlo * v3 + ty.whi * tx.whi * v4;
                }
            }
            dst[(size_t)bin * C + c] = acc * inv_count;
        }
    }
}
