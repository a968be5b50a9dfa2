// torchvision RoIHeads.postprocess_detections + GeneralizedRCNNTransform.postprocess for a
// batch: candidate keys, gather in sorted order, packed fixed-size outputs.
//
// scores [R, C] softmax, boxes [R, C, 4] decoded per class; image b owns rows
// [row_off[b], row_off[b+1]).  A candidate is (row r, class c >= 1), flat index
// r_local * (C - 1) + (c - 1) inside its image, as the reference flattens them.
// Sort key, most significant first:
//   [0 | img | class | descending score (32) | r_local | class]
// The trailing (r_local, class) makes the key unique and orders ties by the flat index; a
// dropped candidate gets ~0, so the live ones of all images come first, image after image.
// Compile with --fmad=false (clip and rescale are single roundings either way; this keeps them so).
#include "common.cuh"

__device__ __forceinline__ float4 clip_box(float4 b, float h, float w) {
    // torchvision clip_boxes_to_image: x into [0, width], y into [0, height]
    b.x = fminf(fmaxf(b.x, 0.f), w);
    b.y = fminf(fmaxf(b.y, 0.f), h);
    b.z = fminf(fmaxf(b.z, 0.f), w);
    b.w = fminf(fmaxf(b.w, 0.f), h);
    return b;
}

__device__ __forceinline__ int image_of_row(const int* __restrict__ row_off, int B, int r) {
    int b = 0;
    while (b + 1 < B && row_off[b + 1] <= r) ++b;
    return b;
}

// Grid over row_off[B] * (C - 1) candidates.
extern "C" __global__ void detection_keys(const float* __restrict__ scores, const float4* __restrict__ boxes,
                                          const int* __restrict__ row_off, int B, int C,
                                          const float* __restrict__ image_sizes, float score_thresh, float min_size,
                                          int img_shift, int code_shift, int score_shift, int row_shift,
                                          u64* __restrict__ keys) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)row_off[B] * (C - 1);
    if (t >= n) return;
    const int r = (int)(t / (C - 1)), c = (int)(t % (C - 1)) + 1;
    const int b = image_of_row(row_off, B, r);
    const float s = scores[(long long)r * C + c];
    const float4 box = clip_box(boxes[(long long)r * C + c], image_sizes[2 * b], image_sizes[2 * b + 1]);
    // reference postprocess_detections: score > thresh, then remove_small_boxes (both sides >= min_size)
    const bool live = s > score_thresh && (box.z - box.x) >= min_size && (box.w - box.y) >= min_size;
    keys[t] = live ? ((u64)b << img_shift) | ((u64)c << code_shift) | ((u64)score_desc_bits(s) << score_shift) |
                         ((u64)(r - row_off[b]) << row_shift) | (u64)c
                   : ~0ull;
}

// Grid over the sorted keys: each image's [start, end) among the live ones (seg zeroed first).
extern "C" __global__ void segment_bounds(const u64* __restrict__ keys, long long n, int img_shift,
                                          int* __restrict__ seg) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 key = keys[i];
    if (key >> 63) return;
    const u64 b = key >> img_shift;
    if (i == 0 || (keys[i - 1] >> img_shift) != b) seg[2 * b] = (int)i;
    if (i == n - 1 || (keys[i + 1] >> img_shift) != b) seg[2 * b + 1] = (int)(i + 1);
}

extern "C" __global__ void detection_gather(const u64* __restrict__ keys, const float4* __restrict__ boxes,
                                            const int* __restrict__ row_off, int C,
                                            const float* __restrict__ image_sizes, long long n, int img_shift,
                                            int row_shift, u64 row_mask, u64 class_mask,
                                            float4* __restrict__ sboxes, int* __restrict__ codes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const u64 key = keys[i];
    const int b = (int)(key >> img_shift), c = (int)(key & class_mask);
    const int r = row_off[b] + (int)((key >> row_shift) & row_mask);
    sboxes[i] = clip_box(boxes[(long long)r * C + c], image_sizes[2 * b], image_sizes[2 * b + 1]);
    codes[i] = c;
}

// Grid over B * D.  rank: live keys after rank_keys and a second sort; seg_off: each image's
// segment in it; kept_count: kept rows per image.  Unused slots are zero.
extern "C" __global__ void detection_outputs(const u64* __restrict__ rank, const int* __restrict__ seg_off,
                                             const int* __restrict__ kept_count, const float* __restrict__ scores,
                                             const float4* __restrict__ boxes, const int* __restrict__ row_off,
                                             int B, int C, int D, const float* __restrict__ image_sizes,
                                             const float* __restrict__ original_sizes, int row_shift, u64 row_mask,
                                             u64 class_mask, float4* __restrict__ out_boxes,
                                             float* __restrict__ out_scores, int* __restrict__ out_labels,
                                             int* __restrict__ out_num) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)B * D) return;
    const int b = (int)(t / D), j = (int)(t % D);
    const int n = min(kept_count[b], D);
    if (j == 0) out_num[b] = n;
    float4 box = make_float4(0.f, 0.f, 0.f, 0.f);
    float score = 0.f;
    int label = 0;
    if (j < n) {
        const u64 key = rank[seg_off[b] + j];
        const int c = (int)(key & class_mask);
        const int r = row_off[b] + (int)((key >> row_shift) & row_mask);
        const float h = image_sizes[2 * b], w = image_sizes[2 * b + 1];
        box = clip_box(boxes[(long long)r * C + c], h, w);
        // torchvision resize_boxes: x * (orig_w / resized_w), y * (orig_h / resized_h), fp32
        const float ratio_h = original_sizes[2 * b] / h, ratio_w = original_sizes[2 * b + 1] / w;
        box.x *= ratio_w;
        box.z *= ratio_w;
        box.y *= ratio_h;
        box.w *= ratio_h;
        score = scores[(long long)r * C + c];
        label = c;
    }
    out_boxes[t] = box;
    out_scores[t] = score;
    out_labels[t] = label;
}
