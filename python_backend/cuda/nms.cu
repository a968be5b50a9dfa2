// Grouped bitmask NMS over sorted segments (one segment per image), all groups in one launch.
//
// Input layout, built by the callers (proposals.cu, postprocess.cu, nms.py):
//   * elements are sorted by a 64-bit key  [img | group code | descending score | tie-break],
//     so each image is a contiguous segment [seg_off[b], seg_off[b+1]), and inside it each group
//     (RPN level, or class) is a contiguous run with scores descending, ties in input order;
//   * boxes[i] (x1, y1, x2, y2) and codes[i] (the group code) in that sorted order; codes are
//     ascending inside a segment, codes >= invalid_code mark rows that take no part.
//
// nms_mask writes, for row i and 64-column block cb of its segment, the bits of later columns j of
// the same group with IoU(i, j) > thr (torchvision nms_kernel's mask, restricted to one group).
// nms_reduce walks each group with one warp (torchvision's host-side reduction, on the GPU).
//
// Compile with --fmad=false: IoU must be inter / (area_i + area_j - inter) rounded step by step
// in fp32, as torchvision's CPU kernel and the NumPy reference compute it.

#include "common.cuh"

__device__ __forceinline__ float box_iou(const float4 a, const float4 b) {
    const float left = fmaxf(a.x, b.x), top = fmaxf(a.y, b.y);
    const float right = fminf(a.z, b.z), bottom = fminf(a.w, b.w);
    const float w = fmaxf(right - left, 0.f), h = fmaxf(bottom - top, 0.f);
    const float inter = w * h;
    const float area_a = (a.z - a.x) * (a.w - a.y);
    const float area_b = (b.z - b.x) * (b.w - b.y);
    // Two zero-area boxes give 0 / 0 = NaN, which never suppresses (as in torchvision).
    return inter / (area_a + area_b - inter);
}

// Grid (nb, nb, B), 64 threads.  Only blocks whose rows and columns can share a group do work;
// every mask word nms_reduce reads is written by such a block (see nms_reduce).
// The diagonal blocks also record each group's [start, end) inside its segment, so no host
// round trip is needed to find the groups.
extern "C" __global__ void nms_mask(const float4* __restrict__ boxes, const int* __restrict__ codes,
                                    const int* __restrict__ seg_off, int nb, int invalid_code, int ncodes,
                                    double thr, u64* __restrict__ mask, int* __restrict__ gstart,
                                    int* __restrict__ gend) {
    const int b = blockIdx.z, rb = blockIdx.y, cb = blockIdx.x, t = threadIdx.x;
    const int base = seg_off[b];
    const int n = seg_off[b + 1] - base;
    const int r0 = rb * 64, c0 = cb * 64;
    if (cb < rb || r0 >= n || c0 >= n) return;
    const int rn = min(n - r0, 64), cn = min(n - c0, 64);
    const int* code = codes + base;
    if (rb == cb && t < rn) {
        const int i = r0 + t, ci = code[i];
        if (ci < ncodes) {
            if (i == 0 || code[i - 1] != ci) gstart[b * ncodes + ci] = i;
            if (i == n - 1 || code[i + 1] != ci) gend[b * ncodes + ci] = i + 1;
        }
    }
    // Codes ascend inside a segment: rows [r0, r0+rn) and columns [c0, c0+cn) (c0 >= r0) share a
    // group only if the first column's code is <= the last row's code.
    if (code[r0] >= invalid_code || code[c0] > code[r0 + rn - 1]) return;

    __shared__ float4 cbox[64];
    __shared__ int ccode[64];
    if (t < cn) {
        cbox[t] = boxes[base + c0 + t];
        ccode[t] = code[c0 + t];
    }
    __syncthreads();
    if (t < rn) {
        const int i = r0 + t, ci = code[i];
        u64 bits = 0;
        if (ci < invalid_code) {
            const float4 bi = boxes[base + i];
            // torchvision's CPU kernel compares the float IoU with the double threshold.
            for (int j = (rb == cb) ? t + 1 : 0; j < cn; ++j)
                if (ccode[j] == ci && (double)box_iou(bi, cbox[j]) > thr) bits |= 1ull << j;
        }
        mask[(size_t)(base + i) * nb + cb] = bits;
    }
}

// One warp per (image, group): grid B * ngroups blocks of 32 threads, nb * 8 bytes of dynamic
// shared memory (the group's "removed" bitmask).  keep must be zeroed (rows of no group stay 0),
// kept_count too (it receives the number of kept rows per image).
//
// Rows are taken 64 at a time (one mask word): the 64 diagonal words are shuffled through the
// warp and resolved serially in registers, then the warp ORs the masks of the kept rows into the
// removed bits of the later words, each lane owning some words, loads unrolled for parallelism.
// A word (row i, column block w) read here has i in group g and w between i's block and g's
// last block, so block (i / 64, w) holds rows and columns of g and nms_mask wrote it.
extern "C" __global__ void nms_reduce(const u64* __restrict__ mask, const int* __restrict__ seg_off,
                                      const int* __restrict__ gstart, const int* __restrict__ gend, int nb,
                                      int ncodes, int ngroups, unsigned char* __restrict__ keep,
                                      int* __restrict__ kept_count) {
    extern __shared__ u64 remv[];
    __shared__ int krow[64];
    const int lane = threadIdx.x;
    const int b = blockIdx.x / ngroups, g = blockIdx.x % ngroups;
    const int s = gstart[b * ncodes + g], e = gend[b * ncodes + g];
    if (e <= s) return;
    const int base = seg_off[b];
    const u64* m = mask + (size_t)base * nb;
    const int w0 = s >> 6, w1 = (e - 1) >> 6;
    for (int w = w0 + lane; w <= w1; w += 32) remv[w] = 0;
    __syncwarp();
    int kept = 0;
    for (int c = w0; c <= w1; ++c) {
        const int r0 = c << 6;
        const int lo = max(s, r0) - r0, hi = min(e, r0 + 64) - r0;  // bits of this word in the group
        const bool in0 = lane >= lo && lane < hi, in1 = lane + 32 >= lo && lane + 32 < hi;
        const u64 d0 = in0 ? m[(size_t)(r0 + lane) * nb + c] : 0ull;
        const u64 d1 = in1 ? m[(size_t)(r0 + lane + 32) * nb + c] : 0ull;
        u64 removed = remv[c];
        u64 kb = 0;
        for (int i = lo; i < hi; ++i) {
            const u64 di = __shfl_sync(0xffffffffu, i < 32 ? d0 : d1, i & 31);
            if (!((removed >> i) & 1ull)) {
                kb |= 1ull << i;
                removed |= di;
            }
        }
        if (in0) keep[base + r0 + lane] = (unsigned char)((kb >> lane) & 1ull);
        if (in1) keep[base + r0 + lane + 32] = (unsigned char)((kb >> (lane + 32)) & 1ull);
        const int nk = __popcll(kb);
        kept += nk;
        if (c < w1 && nk > 0) {
            if ((kb >> lane) & 1ull) krow[__popcll(kb & ((1ull << lane) - 1ull))] = lane;
            if ((kb >> (lane + 32)) & 1ull) krow[__popcll(kb & ((1ull << (lane + 32)) - 1ull))] = lane + 32;
            __syncwarp();
            for (int w = c + 1 + lane; w <= w1; w += 32) {
                u64 acc = 0;
#pragma unroll 8
                for (int k = 0; k < nk; ++k) acc |= m[(size_t)(r0 + krow[k]) * nb + w];
                remv[w] |= acc;
            }
        }
        __syncwarp();
    }
    if (lane == 0) atomicAdd(&kept_count[b], kept);
}

// Rank keys for the final "top n by score" step: the group code field of each sorted key is
// replaced by 0 (kept) or 1 (suppressed, or in no group), so that sorting again orders each image
// as [kept by descending score, ties by the tie-break field] + [the rest].
extern "C" __global__ void rank_keys(const u64* __restrict__ keys, const unsigned char* __restrict__ keep,
                                     long long n, int code_shift, u64 code_field, u64* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = (keys[i] & ~code_field) | ((u64)(keep[i] ? 0 : 1) << code_shift);
}

// Generic keys for batched_nms(boxes, scores, idxs): one segment, code = idxs (dense ranks).
extern "C" __global__ void generic_keys(const float* __restrict__ scores, const int* __restrict__ idxs,
                                        long long n, int code_shift, int score_shift, u64* __restrict__ keys) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    keys[i] = ((u64)idxs[i] << code_shift) | ((u64)score_desc_bits(scores[i]) << score_shift) | (u64)i;
}

extern "C" __global__ void generic_gather(const u64* __restrict__ keys, const float4* __restrict__ boxes,
                                          long long n, int code_shift, u64 code_mask, u64 idx_mask,
                                          float4* __restrict__ sboxes, int* __restrict__ codes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 key = keys[i];
    sboxes[i] = boxes[key & idx_mask];
    codes[i] = (int)((key >> code_shift) & code_mask);
}
