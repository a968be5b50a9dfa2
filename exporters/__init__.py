"""Exporters: torchvision Faster R-CNN -> rpn/header ONNX, TensorRT engines and a Triton model repository."""
