"""JPEG decoding for preprocess: Pillow on the CPU against nvJPEG through torchvision on the GPU.

Encodes a photograph (scikit-image's astronaut, resized) as JPEG at 640x480 and at 12 megapixels
(4000x3000, a phone photo), then times, per image: Pillow (``Image.open`` + ``convert("RGB")``, as
python_backend/reference/image.py decodes), ``torchvision.io.decode_jpeg(device="cuda")`` one image
per call and a list of images per call.  Also prints how far nvJPEG's pixels are from Pillow's and
what nvJPEG does with a truncated file, a grayscale JPEG and a CMYK JPEG.

    python -m benchmarks.bench_decode [--repeat 20]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

SIZES = {"640x480": (480, 640), "12MP 4000x3000": (3000, 4000)}


def _jpeg(height: int, width: int, mode: str = "RGB", quality: int = 90) -> bytes:
    from PIL import Image
    from skimage import data

    from evaluation.payloads import encode

    img = Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR).convert(mode)
    return encode(np.asarray(img), "JPEG", quality=quality)


def _pillow(data: bytes) -> np.ndarray:
    from python_backend.reference.image import decode_image

    return decode_image(data, max_pixels=1 << 40, min_side=1)  # preprocess's CPU decoder


def _ms(fn, repeat: int, sync: bool) -> float:
    fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _nvjpeg(data: bytes, mode=None):
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device="cuda",
                       mode=mode or ImageReadMode.RGB)


def main(argv=None) -> int:
    import torchvision
    from torchvision.io import decode_jpeg

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, torchvision {torchvision.__version__}\n")
    print("| image | bytes | Pillow ms/image | nvJPEG 1 per call ms/image | nvJPEG 8 per call ms/image | "
          "nvJPEG 16 per call ms/image | max abs diff vs Pillow | mean abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, (h, w) in SIZES.items():
        data = _jpeg(h, w)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        ref = _pillow(data)
        gpu = _nvjpeg(data).permute(1, 2, 0).cpu().numpy()
        diff = np.abs(ref.astype(np.int16) - gpu.astype(np.int16))
        cells = [_ms(lambda: _pillow(data), args.repeat, False), _ms(lambda: _nvjpeg(data), args.repeat, True)]
        for n in (8, 16):
            cells.append(_ms(lambda: decode_jpeg([tensor] * n, device="cuda"), max(3, args.repeat // 4), True) / n)
        print(f"| {label} | {len(data)} | " + " | ".join(f"{c:.2f}" for c in cells)
              + f" | {diff.max()} | {diff.mean():.3f} |", flush=True)

    print("\nnvJPEG on unusual files:")
    data = _jpeg(480, 640)
    for name, payload, mode in (("truncated to half", data[: len(data) // 2], None),
                                ("truncated, last 2 bytes (EOI) cut", data[:-2], None),
                                ("grayscale JPEG", _jpeg(480, 640, "L"), None),
                                ("CMYK JPEG", _jpeg(480, 640, "CMYK"), None)):
        try:
            out = _nvjpeg(payload, mode)
            torch.cuda.synchronize()
            msg = f"decoded, shape {tuple(out.shape)}"
            if "truncated" not in name:
                ref = _pillow(payload)
                msg += f", max abs diff vs Pillow {np.abs(ref.astype(np.int16) - out.permute(1, 2, 0).cpu().numpy()).max()}"
        except Exception as e:  # noqa: BLE001 - what it raises is what we want to see
            msg = f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"- {name}: {msg}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
