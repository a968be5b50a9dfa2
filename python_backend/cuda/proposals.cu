// RPN proposal filtering for a whole batch (torchvision RegionProposalNetwork.filter_proposals
// after its top-k), one block per image for the two sorts, bitmask NMS (nms.cu) in between.
//
// proposals: [B, K, 6] float32 rows x1 y1 x2 y2 objectness level (level -1: padding row).
// Sort key of a row inside its image, most significant first:
//   [code (4 bits) | descending score (32) | k (idx bits)]
// code = level for a live row, invalid_code for a dropped one, so each image's segment of K
// sorted rows holds its live rows grouped by level, by descending score, ties in input order,
// then its dropped rows.  K <= 8192: the keys of one image sort in shared memory.
#include "common.cuh"

// Grid B, 1024 threads, n * 8 bytes of dynamic shared memory (n = K rounded up to a power of 2).
// Writes the sorted keys, boxes and group codes of each image's segment [b*K, (b+1)*K).
extern "C" __global__ void proposal_sort(const float* __restrict__ props, int K, int n, float min_size,
                                         float score_thresh, int invalid_code, int code_shift, int score_shift,
                                         u64 idx_mask, u64* __restrict__ keys, float4* __restrict__ sboxes,
                                         int* __restrict__ codes) {
    extern __shared__ u64 sk[];
    const int b = blockIdx.x;
    const float* img = props + (size_t)b * K * 6;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        u64 key = ~0ull;
        if (k < K) {
            const float* p = img + (size_t)k * 6;
            const float x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3], s = p[4], lv = p[5];
            // reference filter_proposals: level >= 0, remove_small_boxes (both sides >= min_size), score >= thresh
            const bool live = lv >= 0.f && (x2 - x1) >= min_size && (y2 - y1) >= min_size && s >= score_thresh;
            const int code = live ? min((int)lv, invalid_code - 1) : invalid_code;
            key = ((u64)code << code_shift) | ((u64)(live ? score_desc_bits(s) : 0u) << score_shift) | (u64)k;
        }
        sk[k] = key;
    }
    __syncthreads();
    block_bitonic_sort(sk, n);
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const u64 key = sk[i];
        const float* p = img + (size_t)(key & idx_mask) * 6;
        const size_t o = (size_t)b * K + i;
        keys[o] = key;
        sboxes[o] = make_float4(p[0], p[1], p[2], p[3]);
        codes[o] = (int)(key >> code_shift);
    }
}

// Grid B, 1024 threads, n * 8 bytes of dynamic shared memory.  After NMS: each image's keys get
// their code field replaced by 0 (kept) / 1 (not), are sorted again, and the first
// min(kept_b, top_n) rows are the image's RoIs by descending score, ties in input order
// (batched_nms(...)[:top_n]).  Writes rois [sum_b n_b, 4] image after image, roi_img, and
// counts[0..B) = n_b, counts[B] = their sum.
extern "C" __global__ void proposal_topk(const float* __restrict__ props, const u64* __restrict__ keys,
                                         const unsigned char* __restrict__ keep, const int* __restrict__ kept_count,
                                         int B, int K, int n, int top_n, int code_shift, u64 idx_mask,
                                         float4* __restrict__ rois, int* __restrict__ roi_img,
                                         int* __restrict__ counts) {
    extern __shared__ u64 sk[];
    const int b = blockIdx.x;
    const u64 field = ~0ull << code_shift;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        u64 key = ~0ull;
        if (i < K) {
            const size_t o = (size_t)b * K + i;
            key = (keys[o] & ~field) | ((u64)(keep[o] ? 0 : 1) << code_shift);
        }
        sk[i] = key;
    }
    __syncthreads();
    block_bitonic_sort(sk, n);
    int off = 0;
    for (int bb = 0; bb < b; ++bb) off += min(kept_count[bb], top_n);
    const int nb = min(kept_count[b], top_n);
    if (threadIdx.x == 0) {
        counts[b] = nb;
        if (b == B - 1) counts[B] = off + nb;
    }
    const float* img = props + (size_t)b * K * 6;
    for (int j = threadIdx.x; j < nb; j += blockDim.x) {
        const float* p = img + (size_t)(sk[j] & idx_mask) * 6;
        rois[off + j] = make_float4(p[0], p[1], p[2], p[3]);
        roi_img[off + j] = b;
    }
}
