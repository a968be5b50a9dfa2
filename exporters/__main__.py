"""Command line: ``python -m exporters {export,serve,demo}``.

export  torch model -> ONNX (checked TensorRT-ready) -> model repository
serve   export if the repository is missing, start tritonserver, wait until ready
demo    export, serve, and run the gRPC client on sample images (the README's main command)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from python_backend import names
from python_backend.settings import check_buckets, default_buckets, parse_buckets, validate_canvas

from . import loading
from .repository import DEVICES, TARGETS, RepositoryOptions, write_repository

log = logging.getLogger("exporters")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = ROOT / "model_repository"


def parse_canvas(text: str) -> tuple[int, int]:
    """``"800x1344"`` (height x width) -> (800, 1344); errors name the bad value."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"canvas must be HEIGHTxWIDTH such as 800x1344, got {text!r}") from None
    try:
        validate_canvas(h, w)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return h, w


def parse_bucket_arg(text: str) -> str | tuple[tuple[int, int], ...]:
    """``--rpn-buckets``: "auto", "none" or "HxW,HxW"; the canvas check comes once it is known."""
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower()
    try:
        buckets = parse_buckets(text)
        for h, w in buckets:
            validate_canvas(h, w)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return buckets


def resolve_buckets(arg, settings) -> tuple[tuple[int, int], ...]:
    if arg == "auto":
        return default_buckets(settings)
    if arg == "none":
        return ()
    return check_buckets(arg, settings.canvas)


def add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", default="random",
                   help="'coco' (torchvision's COCO weights, downloaded and cached by torchvision), "
                        "'random' (seeded random weights, offline) or a state_dict checkpoint path")
    g.add_argument("--num-classes", type=int, default=91, help="classes incl. background, for --weights random")
    g.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    g.add_argument("--peaky", type=float, default=1.0,
                   help="for --weights random: scale of the classifier weights (see exporters.loading.random_model)")
    g.add_argument("--class-names", type=Path, help="text file, one class name per line, background first")
    g.add_argument("--min-size", type=int, help="override the model's transform min_size")
    g.add_argument("--max-size", type=int, help="override the model's transform max_size")
    g = p.add_argument_group("repository")
    g.add_argument("--canvas", type=parse_canvas, default=(800, 1344),
                   help="fixed network input HEIGHTxWIDTH, multiples of 32 (default 800x1344 fits every landscape "
                        "image at torchvision's 800/1333 resize; use 1344x1344 for portrait images too)")
    g.add_argument("--target", choices=TARGETS, default="python", help="how rpn and header are served")
    g.add_argument("--device", choices=DEVICES, default="cpu", help="where python-backend steps run")
    g.add_argument("--max-batch-size", type=int, default=8, help="images per batch")
    g.add_argument("--instances", type=int, default=1, help="instances of every step (instance_group count)")
    g.add_argument("--postprocess-instances", type=int, default=0,
                   help="instances of postprocess, the one step without a batcher (0, the default: 2 with "
                        "--device gpu, else as --instances)")
    g.add_argument("--queue-delay-us", type=int, default=0,
                   help="dynamic batcher max_queue_delay_microseconds (0: batch what is queued when an instance frees)")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the dense networks: TensorRT engines (--target tensorrt) or the "
                        "TorchScript traces (--target torch: fp16 runs backbone/FPN/RPN head and box head "
                        "in float16, the rest in float32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="--target torch --precision fp16: run the rpn trace in channels-last memory format "
                        "(faster fp16 convolutions; fp32 ones get slower, so fp32 never uses it)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="--target torch --device gpu: replay the rpn as one CUDA graph per batch size")
    g.add_argument("--optimize-for-inference", action=argparse.BooleanOptionalAction, default=True,
                   help="--target torch --device gpu --precision fp16: freeze the rpn trace and let "
                        "torch.jit.optimize_for_inference fuse convolution + bias + ReLU (cuDNN; "
                        "H100: 2.20 against 3.14 ms/image at batch 8)")
    g.add_argument("--rpn-buckets", type=parse_bucket_arg, default="auto",
                   help="--target torch: smaller canvases HxW[,HxW...] to trace the rpn at as well; each batch "
                        "runs on the smallest that holds it. 'auto' (default): the padded sizes of square, 4:3 "
                        "and 3:4 images where smaller than the canvas (800x800 and 800x1088 for 800x1344); "
                        "'none': the full canvas only")
    g.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")


def load_model(args):
    kw = {"min_size": args.min_size, "max_size": args.max_size}
    if args.weights == "random":
        model = loading.random_model(args.num_classes, seed=args.seed, peaky=args.peaky, **kw)
    elif args.weights == "coco":
        model = loading.coco_model(**kw)
    else:
        model = loading.checkpoint_model(args.weights, **kw)
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    class_names = loading.read_class_names(args.class_names, num_classes)
    return model, loading.settings_from_model(model, args.canvas, class_names)


def export(args) -> Path:
    from .onnx_export import export_all

    t0 = time.monotonic()
    log.info("[1/3] loading model (weights: %s)", args.weights)
    model, settings = load_model(args)
    buckets = resolve_buckets(args.rpn_buckets, settings) if args.target == "torch" else ()
    options = RepositoryOptions(target=args.target, device=args.device, max_batch_size=args.max_batch_size,
                                instances=args.instances, postprocess_instances=args.postprocess_instances,
                                queue_delay_us=args.queue_delay_us,
                                torch_precision=args.precision, torch_channels_last=args.channels_last,
                                torch_cuda_graphs=args.cuda_graphs,
                                torch_optimize_for_inference=args.optimize_for_inference,
                                torch_rpn_buckets=buckets)
    with tempfile.TemporaryDirectory() as tmp:
        if args.target == "torch":
            from .torch_export import export_torch

            log.info("[2/3] tracing rpn and header (TorchScript, %s, on %s) on a %dx%d canvas",
                     args.precision, args.device, *settings.canvas)
            if buckets:
                log.info("      and the rpn at the canvas buckets %s", ", ".join(f"{h}x{w}" for h, w in buckets))
            traces = export_torch(model, settings, Path(tmp), device=args.device, precision=args.precision,
                                  buckets=buckets)
            log.info("[3/3] writing the model repository to %s (target torch, device %s)",
                     args.repository, args.device)
            write_repository(args.repository, settings, {}, options, torch_models=traces)
            log.info("done in %.1f s", time.monotonic() - t0)
            return args.repository
        log.info("[2/3] exporting rpn and header to ONNX on a %dx%d canvas", *settings.canvas)
        onnx_paths = export_all(model, settings, Path(tmp))
        plans = None
        if args.target == "tensorrt":
            from .tensorrt_build import build_plans

            log.info("[2/3] building TensorRT engines (%s); this takes minutes", args.precision)
            plans = build_plans(onnx_paths, Path(tmp), settings, options, precision=args.precision)
        log.info("[3/3] writing the model repository to %s (target %s, device %s)",
                 args.repository, args.target, args.device)
        write_repository(args.repository, settings, onnx_paths, options, plans=plans)
    log.info("done in %.1f s", time.monotonic() - t0)
    return args.repository


def repository_ready(path: Path) -> bool:
    return all((path / n / "config.pbtxt").is_file() for n in (names.ENSEMBLE, *names.STEPS))


def serve(args, block: bool = True):
    from fasterrcnn.server import TritonServer

    if args.rebuild or not repository_ready(args.repository):
        export(args)
    server = TritonServer(args.repository, grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, binary=args.tritonserver,
                          cuda_pool_bytes=(4 << 30) if args.device == "gpu" else 0, mps=args.mps)
    log.info("starting tritonserver on %s (gRPC %d, HTTP %d)", args.repository, args.grpc_port, args.http_port)
    server.start()
    log.info("server ready: gRPC %s", server.grpc_url)
    if not block:
        return server
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", help="path of a tritonserver binary (default: the nvidia-pytriton wheel's, "
                                          "then tritonserver on PATH)")
    p.add_argument("--rebuild", action="store_true", help="export again even if the repository exists")
    p.add_argument("--mps", action="store_true",
                   help="run the server under a CUDA MPS daemon of its own, so that the python-backend steps' "
                        "processes share the GPU at once instead of by time slices (--device gpu)")


def demo(args) -> None:
    from client import detect

    if args.weights == "random" and loading.coco_weights_cached():
        log.info("COCO weights found in torch's cache: using them")
        args.weights = "coco"
    args.rebuild = True
    server = serve(args, block=False)
    try:
        images = detect.sample_images(args.out / "samples")
        results = detect.run(server.grpc_url, images, concurrency=2, draw_dir=args.out / "annotated")
        for item in results:
            top = ", ".join(f"{d['label']} {d['score']:.2f}" for d in item["detections"][:5])
            print(f"{Path(item['image']).name}: {len(item['detections'])} detections; top: {top}")
        (args.out / "detections.json").write_text(json.dumps(results, indent=1))
        print(f"detections: {args.out / 'detections.json'}; annotated images: {args.out / 'annotated'}")
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export ONNX and write the model repository")
    add_export_args(p)
    p = sub.add_parser("serve", help="start tritonserver on the repository (exporting it if missing)")
    add_export_args(p)
    add_serve_args(p)
    p = sub.add_parser("demo", help="export, serve and detect on sample images through gRPC")
    add_export_args(p)
    add_serve_args(p)
    p.add_argument("--out", type=Path, default=ROOT / "out", help="where detections and annotated images go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        {"export": export, "serve": serve, "demo": demo}[args.command](args)
    except (loading.CheckpointError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
