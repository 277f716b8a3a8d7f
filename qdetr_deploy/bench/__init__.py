"""Benchmarks: preprocessing (numpy + PIL), latency, COCO evaluation, reports. No torch on this path.

Submodules are imported on use (``from qdetr_deploy.bench.run import bench_engines``) so that, e.g.,
``evaluate`` does not load onnxruntime and preprocessing does not load matplotlib.
"""
