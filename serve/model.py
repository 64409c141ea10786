"""The KServe Model: an onnxruntime InferenceSession behind the Open Inference (V2) protocol.

It is ready only after the file is loaded, checked against the export contract and one warm-up
inference has run. Each request is checked (serve.validation); a bad one raises kserve's
InvalidInput, which kserve answers with 400 and the message, and the server carries on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from orbit.errors import UserError
from serve import metadata
from serve._kserve import (
    InferOutput,
    InferRequest,
    InferResponse,
    InvalidInput,
    Model,
    ModelNotFound,
)
from serve.validation import RequestError, check_requested_outputs, pixels_from_request


class RefusalsAsOneLine(logging.Filter):
    """kserve logs every refused request (InvalidInput, ModelNotFound) at ERROR with chained
    tracebacks, so any client could flood the log; a refusal is the client's mistake: one
    WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InvalidInput | ModelNotFound):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "refused a request: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("kserve").addFilter(RefusalsAsOneLine())


class OrbitOnnxModel(Model):
    """One exported orbit ONNX file served under `name`."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        max_batch: int,
        intra_op_threads: int = 0,
        opened: tuple[Any, metadata.OrbitModelInfo] | None = None,
    ):
        """`opened`: the (session, info) of metadata.load(path) if the caller already has it."""
        super().__init__(name)
        self.path = Path(path)
        self.max_batch = max_batch
        self.intra_op_threads = intra_op_threads
        self._opened = opened
        self.session: Any = None
        self.info: metadata.OrbitModelInfo | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def load(self) -> bool:
        """Open and check the file (UserError if it is unusable), warm up, then become ready."""
        session, info = self._opened or metadata.load(self.path, self.intra_op_threads)
        self._opened = None
        # Batches of 1 and 2: a graph that cannot run (or only at one batch size) fails here,
        # as one line at start-up, not as a 500 on the first request.
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failure is reported once, by us, as one line
        mid = 0.5 * sum(info.value_range)
        for batch in (1, 2):
            warm = np.full((batch, *info.input_shape), mid, dtype=np.float32)
            try:
                got = session.run(list(metadata.OUTPUTS), {metadata.INPUT: warm}, quiet)
            except Exception as e:  # onnxruntime raises its own InvalidArgument/Fail/... types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(
                    f"{self.path}: the graph fails on a warm-up batch of {batch} ({first});"
                    " re-export it with `orbit export`"
                ) from None
            if any(v.shape[0] != batch for v in got):
                raise UserError(
                    f"{self.path}: the graph's outputs do not have one row per input at batch"
                    f" {batch}; re-export it with `orbit export`"
                )
        self.session, self.info = session, info
        self.ready = True
        return self.ready

    def start(self) -> None:
        """kserve's default start() marks any model ready; ours is ready only once load() ran."""
        self.ready = self.session is not None

    def __getstate__(self) -> dict[str, Any]:
        # kserve pickles the model into each worker process when --workers > 1: the session
        # cannot travel, so each worker reopens the file (and warms up) on arrival.
        state = self.__dict__.copy()
        state.update(session=None, info=None, ready=False, _opened=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    # --- V2 metadata ---------------------------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        assert self.info is not None
        return [t.as_v2() for t in self.info.inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        assert self.info is not None
        return [t.as_v2() for t in self.info.outputs]

    # --- inference -----------------------------------------------------------------------------

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("send an Open Inference (V2) request to /v2/models/NAME/infer")
        # onnxruntime releases the GIL: run off the event loop so health checks stay answered.
        return await asyncio.to_thread(self.infer, payload)

    def infer(self, request: InferRequest) -> InferResponse:
        """Check the request, run the session, and build the V2 response (with `suspicious`)."""
        assert self.info is not None
        info = self.info
        try:
            inputs = [(i.name, i.datatype, list(i.shape), i.data) for i in request.inputs]
            pixels = pixels_from_request(inputs, info.input_shape, info.value_range, self.max_batch)
            if request.request_outputs:
                available = [t.name for t in info.outputs]
                check_requested_outputs([o.name for o in request.request_outputs], available)
        except RequestError as e:
            raise InvalidInput(str(e)) from e
        results = self.predict_arrays(pixels)
        outputs = [
            InferOutput(
                name=spec.name,
                shape=list(results[spec.name].shape),
                datatype=spec.datatype,
                data=results[spec.name],
            )
            for spec in info.outputs
        ]
        return InferResponse(
            response_id=request.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    def predict_arrays(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's outputs for checked pixels, and whether mutual_info > threshold."""
        assert self.info is not None
        names = list(metadata.OUTPUTS)
        values = self.session.run(names, {metadata.INPUT: pixels})
        out = dict(zip(names, values, strict=True))
        out[metadata.SUSPICIOUS] = out["mutual_info"] > self.info.mutual_info_threshold
        return out
