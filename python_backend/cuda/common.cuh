// Helpers shared by the .cu files of this package (included through -I<this folder>).

typedef unsigned long long u64;

// A float score as 32 key bits that sort ascending when the score descends.
// Flip all bits of negatives and the sign bit of positives (IEEE order -> unsigned order), then
// invert.  -0.0 is folded into +0.0 first: NumPy treats them as a tie, so must the key.
__device__ __forceinline__ unsigned int score_desc_bits(float s) {
    if (s == 0.f) s = 0.f;
    unsigned int u = __float_as_uint(s);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

// In-place ascending bitonic sort of n (a power of two) keys in shared memory by the whole block.
// Used to sort one image's proposals (n = 8192 at most: 64 KB) without a global sort.
__device__ __forceinline__ void block_bitonic_sort(u64* keys, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
                const int lo = 2 * t - (t & (stride - 1));  // first of the pair (lo, lo + stride)
                const int hi = lo + stride;
                const bool ascending = (lo & size) == 0;
                const u64 a = keys[lo], b = keys[hi];
                if ((a > b) == ascending) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}
