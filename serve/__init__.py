"""Serving: an exported orbit ONNX file behind kserve's ModelServer (Open Inference / V2 REST).

Nothing here imports torch (the serving image has none): only onnxruntime, kserve and numpy.
"""
