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
