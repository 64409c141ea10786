"""Endpoint throughput and latency of `orbit serve`, from tritonclient on loopback.

Starts `orbit serve MODEL` on a free loopback port (default MODEL: a small ensemble fixture built
with onnx.helper, the shape of an 8x8 digits model), then for batch 1 and 32 and for 1 and 8
concurrent clients sends requests until --requests are answered or --seconds pass, whichever
comes first. Prints requests/s, images/s, p50/p99 latency, and ratios measured in this run:
endpoint p50 over onnxruntime run in-process at the same batch (the serving overhead), images/s
at batch 32 over batch 1 (what batching buys), and the time to decode one binary request with
kserve's decoder over serve's (why serve.modelserver has its own).

    .venv/bin/python benchmarks/bench_serve.py [--model runs/demo/export/model.onnx]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from onnx_fixtures import running_server, write_model  # noqa: E402

OUTPUTS = ["probs", "label", "agreement", "mutual_info", "suspicious"]


def _median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_decode() -> None:
    """One binary (tritonclient-style) request decoded by kserve and by serve.modelserver."""
    import json

    from serve._kserve import InferRequest
    from serve.modelserver import decode_binary_request

    print("decode of one binary request (median):")
    for shape, runs in [((32, 1, 8, 8), 200), ((256, 3, 32, 32), 10)]:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        spec = {"name": "pixels", "shape": list(shape), "datatype": "FP32"}
        spec["parameters"] = {"binary_data_size": x.nbytes}
        head = json.dumps({"inputs": [spec]}).encode()
        body = head + x.tobytes()
        n = len(head)
        theirs = _median_seconds(lambda b=body, n=n: InferRequest.from_bytes(b, n, "m"), runs)
        ours = _median_seconds(lambda b=body, n=n: decode_binary_request(b, n, "m"), runs)
        print(
            f"  {'x'.join(map(str, shape)):>12}: kserve {theirs * 1e3:9.3f} ms,"
            f" serve {ours * 1e3:7.3f} ms, ratio {theirs / ours:,.0f}x"
        )
    print()


def _input_shape(model: Path) -> list[int]:
    shape = ort.InferenceSession(str(model)).get_inputs()[0].shape
    return [int(d) for d in shape[1:]]


def _onnxruntime_p50(model: Path, x: np.ndarray, runs: int) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    session.run(None, {"pixels": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {"pixels": x})
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50))


def _load(url: str, x: np.ndarray, clients: int, requests: int, seconds: float) -> dict:
    """`clients` threads, each with its own tritonclient, share a budget of requests and time."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    budget = [requests]
    deadline = time.perf_counter() + seconds

    def work() -> None:
        client = triton.InferenceServerClient(url, network_timeout=60)
        inp = triton.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        outs = [triton.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS]
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                t = time.perf_counter()
                try:
                    client.infer("orbit", [inp], outputs=outs)
                except Exception as e:
                    errors.append(str(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
        finally:
            client.close()

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    return {
        "answered": len(latencies),
        "errors": len(errors),
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an orbit ONNX file (default: a fixture)")
    parser.add_argument("--requests", type=int, default=600, help="per configuration")
    parser.add_argument("--seconds", type=float, default=15.0, help="per configuration")
    args = parser.parse_args()
    bench_decode()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_model(Path(tmp) / "model.onnx", members=16)
        shape = _input_shape(model)
        print(f"model: {model if args.model else 'fixture: 16 linear members, 1x8x8 -> 10'}")
        print(f"input: [batch, {', '.join(map(str, shape))}]; client: tritonclient.http, binary")
        print(f"bounds: {args.requests} requests or {args.seconds:g} s per row\n")
        rng = np.random.default_rng(0)
        rows = []
        with running_server(model, tmp, "--max-batch", "256") as server:
            for batch in (1, 32):
                x = rng.random((batch, *shape), dtype=np.float32)
                direct = _onnxruntime_p50(model, x, runs=200)
                _load(server.url, x, 1, 50, 5.0)  # warm the connection and caches
                for clients in (1, 8):
                    r = _load(server.url, x, clients, args.requests, args.seconds)
                    rows.append((batch, clients, r, direct))
            alive = server.process.poll() is None

    header = f"{'batch':>5} {'clients':>7} {'answered':>8} {'errors':>6} {'req/s':>8}"
    header += f" {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ort p50 ms':>10} {'p50/ort':>8}"
    print(header)
    for batch, clients, r, direct in rows:
        print(
            f"{batch:>5} {clients:>7} {r['answered']:>8} {r['errors']:>6} {r['rps']:>8.1f}"
            f" {r['rps'] * batch:>9.0f} {r['p50'] * 1e3:>7.2f} {r['p99'] * 1e3:>7.2f}"
            f" {direct * 1e3:>10.3f} {r['p50'] / direct:>8.1f}"
        )
    by = {(b, c): r for b, c, r, _ in rows}
    for clients in (1, 8):
        gain = by[(32, clients)]["rps"] * 32 / by[(1, clients)]["rps"]
        print(f"images/s, batch 32 over batch 1, {clients} client(s): {gain:.1f}x")
    print(f"server still up after the run: {alive}")


if __name__ == "__main__":
    main()
