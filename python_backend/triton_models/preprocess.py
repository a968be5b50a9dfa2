"""Triton model: decode (or take decoded) images, resize, normalize, pad onto a canvas.

Serves ``preprocess`` (encoded bytes, ``[1, N]`` uint8: one image per request) and
``preprocess_raw`` (uint8 HWC), by the model's name.  Each request's images are decoded and
checked on their own, and the request gets the smallest of the settings' canvases that holds
them all (a bad image, or one no canvas holds, fails only its own request).  The good requests
then go through the step backend's ``preprocess_batch``, one call per canvas: NumPy on a CPU
instance, CuPy on the instance's GPU (outputs stay on the GPU).  Requests on different canvases
get ``images`` of different shapes, and the rpn's dynamic batcher joins only equal shapes, so
downstream every batch is on one canvas.

Images are decoded by Pillow (libjpeg-turbo for JPEGs: the pixels a torchvision user gets from
``PIL.Image.open(f).convert("RGB")``), the requests of one ``execute`` side by side by a pool of
``decode_threads`` threads (the model parameter; "0": one per CPU, at most
:data:`~python_backend.triton_io.MAX_AUTO_THREADS`), as Pillow releases the GIL while it decodes.  The opt-in exception:
JPEGs on a GPU instance whose parameter ``jpeg_decoder`` is "gpu", whose headers are checked here
and which nvJPEG decodes in ``preprocess_batch``, one call per batch.
"""
from concurrent.futures import Future, ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.reference.image import BadImageError, batch_canvas, batch_sizes
from python_backend.triton_io import decode_threads, payload_images, request_payload
from python_backend.triton_models.adapter import BadRequest, StepAdapter, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = StepAdapter(args, pb_utils)
        self.raw = args["model_name"] == names.PREPROCESS_RAW
        a = self.adapter
        self.defer_jpeg = a.device == "gpu" and a.params.get("jpeg_decoder", "pillow") == "gpu"
        threads = 1 if self.raw else decode_threads(a.params.get("decode_threads", "0"))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def execute(self, requests):
        if self.pool is None or len(requests) < 2:
            return self.adapter.execute(requests, self._run, read=lambda r: self._images(self._payload(r)))
        # Triton's request objects are read here, on the model's own thread; the pool only decodes
        decoded = {}
        for request in requests:
            try:
                decoded[id(request)] = self.pool.submit(self._images, self._payload(request))
            except Exception as e:  # noqa: BLE001 - this request's error, which the adapter gives back
                decoded[id(request)] = failed = Future()
                failed.set_exception(e)
        return self.adapter.execute(requests, self._run, read=lambda r: decoded[id(r)].result())

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _payload(self, request):
        try:
            return request_payload(pb_utils, request, self.raw)
        except BadImageError as e:
            raise BadRequest(f"bad input image: {e}") from None

    def _images(self, payload):
        """(the payload's decoded images, the canvas that holds them)."""
        settings = self.adapter.settings
        try:
            images = payload_images(payload, settings, defer_jpeg=self.defer_jpeg)
            canvas = batch_canvas(*batch_sizes(images, settings), settings)
        except BadImageError as e:
            raise BadRequest(f"bad input image: {e}") from None
        return images, canvas

    def _run(self, items):
        """One ``preprocess_batch`` per canvas; each request's outputs in request order."""
        results = [None] * len(items)
        for canvas in dict.fromkeys(canvas for _, canvas in items):
            group = [i for i, (_, c) in enumerate(items) if c == canvas]
            images = [image for i in group for image in items[i][0]]
            try:
                outputs = self.adapter.backend.preprocess_batch(images, self.adapter.settings, canvas)
            except BadImageError as e:  # a JPEG that only decoding showed bad: the adapter retries alone
                raise BadRequest(f"bad input image: {e}") from None
            for i, own in zip(group, split(outputs, [len(items[i][0]) for i in group])):
                results[i] = own
        return results
