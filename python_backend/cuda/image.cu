// GeneralizedRCNNTransform for one image in one launch: uint8 HWC -> normalized, bilinear-resized
// float32 CHW, zero-padded onto the canvas.  GPU twin of python_backend.reference.image
// (transform_image + the padding of preprocess_batch).  Compiled with --fmad=false: every step
// rounds like NumPy's float32 operation of the same order, so the two agree bit for bit.

// One thread per canvas element of the image ([3, canvas_h, canvas_w]); threads past the resized
// image write the padding zeros, so the output needs no memset.
extern "C" __global__ void resize_normalize_pad(
    const unsigned char* __restrict__ image,  // [in_h, in_w, 3]
    const int in_w,
    const int* __restrict__ ys,     // [2, out_h]: the upper and lower source rows of each output row
    const float* __restrict__ hy,   // [2, out_h]: their weights
    const int* __restrict__ xs,     // [2, out_w]: the left and right source columns
    const float* __restrict__ wx,   // [2, out_w]: their weights
    const int out_h, const int out_w,
    const float* __restrict__ mean_std,  // [6]: mean of R, G, B, then std of R, G, B
    float* __restrict__ out,             // [3, canvas_h, canvas_w]
    const int canvas_h, const int canvas_w) {
    const long long n = 3LL * canvas_h * canvas_w;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int x = (int)(i % canvas_w);
    const int y = (int)((i / canvas_w) % canvas_h);
    const int c = (int)(i / ((long long)canvas_w * canvas_h));
    if (y >= out_h || x >= out_w) {
        out[i] = 0.f;
        return;
    }
    const float mean = mean_std[c], std = mean_std[3 + c];
    const int y0 = ys[y], y1 = ys[out_h + y], x0 = xs[x], x1 = xs[out_w + x];
    // NumPy order: u8 -> float32, / 255, - mean, / std; then the bilinear blend of four taps.
    const float a = ((float)image[((long long)y0 * in_w + x0) * 3 + c] / 255.f - mean) / std;
    const float b = ((float)image[((long long)y0 * in_w + x1) * 3 + c] / 255.f - mean) / std;
    const float d = ((float)image[((long long)y1 * in_w + x0) * 3 + c] / 255.f - mean) / std;
    const float e = ((float)image[((long long)y1 * in_w + x1) * 3 + c] / 255.f - mean) / std;
    const float w0 = wx[x], w1 = wx[out_w + x];
    const float top = w0 * a + w1 * b;
    const float bottom = w0 * d + w1 * e;
    out[i] = hy[y] * top + hy[out_h + y] * bottom;
}
