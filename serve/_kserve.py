"""kserve, imported without letting it read our command line.

kserve.model_server runs an argparse parser over sys.argv at import time, so `orbit serve
--workers 2` (or pytest's flags) would leak into its module-level defaults. Every serve module
imports kserve through here, with sys.argv reduced to the program name for the import.
"""

from __future__ import annotations

import sys

_argv = sys.argv
sys.argv = _argv[:1]
try:
    from kserve import Model, ModelServer
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import (
        InferInput,
        InferOutput,
        InferRequest,
        InferResponse,
        RequestedOutput,
    )
    from kserve.utils.numpy_codec import to_np_dtype
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InvalidInput",
    "Model",
    "ModelNotFound",
    "ModelServer",
    "RequestedOutput",
    "to_np_dtype",
]
