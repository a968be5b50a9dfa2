// RPN proposal filtering for a whole batch (torchvision RegionProposalNetwork.filter_proposals
// after its top-k): validity + sort keys, gather in sorted order, and the final compaction.
//
// proposals: [B, K, 6] float32 rows x1 y1 x2 y2 objectness level (level -1: padding row).
// Sort key, most significant first: [img | code (4 bits) | descending score (32) | k (idx bits)];
// code = level for a live row, invalid_code for a dropped one, so each image stays one segment of
// exactly K sorted rows: its live rows grouped by level, then its dropped rows.
#include "common.cuh"

extern "C" __global__ void proposal_keys(const float* __restrict__ props, int B, int K, float min_size,
                                         float score_thresh, int invalid_code, int img_shift, int code_shift,
                                         int score_shift, u64* __restrict__ keys) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * K) return;
    const int b = (int)(t / K), k = (int)(t % K);
    const float* p = props + t * 6;
    const float x1 = p[0], y1 = p[1], x2 = p[2], y2 = p[3], s = p[4], lv = p[5];
    // reference filter_proposals: level >= 0, remove_small_boxes (both sides >= min_size), score >= thresh
    const bool live = lv >= 0.f && (x2 - x1) >= min_size && (y2 - y1) >= min_size && s >= score_thresh;
    const int code = live ? min((int)lv, invalid_code - 1) : invalid_code;
    keys[t] = ((u64)b << img_shift) | ((u64)code << code_shift) |
              ((u64)(live ? score_desc_bits(s) : 0u) << score_shift) | (u64)k;
}

extern "C" __global__ void proposal_gather(const u64* __restrict__ keys, const float* __restrict__ props,
                                           long long n, int K, int img_shift, int code_shift, u64 code_mask,
                                           u64 idx_mask, float4* __restrict__ sboxes, int* __restrict__ codes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 key = keys[i];
    const long long row = (long long)(key >> img_shift) * K + (long long)(key & idx_mask);
    const float* p = props + row * 6;
    sboxes[i] = make_float4(p[0], p[1], p[2], p[3]);
    codes[i] = (int)((key >> code_shift) & code_mask);
}

// Grid over B * top_n.  rank: keys sorted again after rank_keys, so each image's segment starts
// with its kept rows by descending score.  Writes rois [sum_b n_b, 4] image after image,
// roi_img, and counts[0..B) = n_b = min(kept_b, top_n), counts[B] = sum.
extern "C" __global__ void proposal_rois(const u64* __restrict__ rank, const float* __restrict__ props,
                                         const int* __restrict__ kept_count, int B, int K, int top_n,
                                         u64 idx_mask, float4* __restrict__ rois, int* __restrict__ roi_img,
                                         int* __restrict__ counts) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * top_n) return;
    const int b = (int)(t / top_n), j = (int)(t % top_n);
    int off = 0;
    for (int bb = 0; bb < b; ++bb) off += min(kept_count[bb], top_n);
    const int nb = min(kept_count[b], top_n);
    if (j == 0) {
        counts[b] = nb;
        if (b == B - 1) counts[B] = off + nb;
    }
    if (j < nb) {
        const u64 key = rank[(long long)b * K + j];
        const float* p = props + ((long long)b * K + (long long)(key & idx_mask)) * 6;
        rois[off + j] = make_float4(p[0], p[1], p[2], p[3]);
        roi_img[off + j] = b;
    }
}
