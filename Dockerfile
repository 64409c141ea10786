# The orbit serving image: an exported model.onnx behind `orbit serve` (kserve's ModelServer over
# onnxruntime, Open Inference / V2 REST on port 8080). Only the `serve` extra is installed: no torch.
#
#   docker build -t orbit-serve:0.1.0 .     (the tag `orbit export --kserve` names by default)
#   docker run --rm -p 8080:8080 -v "$PWD/runs/demo/export:/models:ro" orbit-serve:0.1.0
#
# To bake a model in instead of mounting it: a two-line Dockerfile
#   FROM orbit-serve:0.1.0
#   COPY model.onnx /models/model.onnx
# Arguments after the image name replace CMD, e.g. `... orbit-serve:0.1.0 /models/base.onnx
# --host 0.0.0.0 --threads 2` (--threads: onnxruntime's threads, set to the container's CPUs).

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY orbit/ orbit/
COPY serve/ serve/
# constraints.txt: the versions the project is tested with (kserve's private hooks among them).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[serve]" \
    && /opt/venv/bin/python -c "import serve.server, sys; sys.exit('torch' in sys.modules)" \
    && /opt/venv/bin/orbit serve --help >/dev/null

FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 orbit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin orbit \
    && mkdir /models \
    && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /models
USER 10001:10001
EXPOSE 8080
# Ready means: the model is loaded, checked and has answered one warm-up inference (the server
# opens its port only then). Port 8080 is assumed; override HEALTHCHECK if you change --port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["orbit", "serve"]
CMD ["/models/model.onnx", "--host", "0.0.0.0", "--port", "8080"]
