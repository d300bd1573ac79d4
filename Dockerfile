# Phalanx inference service (and trainer) image, CPU build.
#   docker build -t phalanx .
#   docker run --stop-timeout 30 -p 50051:50051 -p 9100:9100 -v $PWD/models:/models phalanx \
#       serve --models /models --name 3m --host 0.0.0.0 --port 50051 --metrics-host 0.0.0.0 --metrics-port 9100
# The model repository is a mounted volume; the service polls it and swaps in new versions live.
# Stopping: SIGTERM drains for --grace-seconds (10), then the forward worker closes and the experience log writes
# its last shard; `docker stop` kills after 10 s unless told otherwise, so run with `--stop-timeout 30` (Kubernetes:
# terminationGracePeriodSeconds: 30), or steps answered in the last seconds may never reach a shard.
# Training in this image: `docker run --no-healthcheck ... phalanx train ...` (the health probe is the service's).
FROM python:3.11-slim

# torch's CPU wheels come from PyTorch's own index; a plain `pip install torch` would pull a CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY trainer ./trainer
COPY service ./service
RUN pip install --no-cache-dir . && useradd --create-home phalanx
USER phalanx

EXPOSE 50051 9100
# grpc.health.v1 through `phalanx health` (exit 0 only while a model serves). It probes 127.0.0.1:$PHALANX_PORT:
# run with `-e PHALANX_PORT=N` when serving on another --port, and with
# `-e PHALANX_HEALTH_ARGS="--tls-ca /certs/ca.pem --tls-server-name NAME"` when serving with TLS.
ENV PHALANX_PORT=50051 PHALANX_HEALTH_ARGS=""
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
    CMD phalanx health --server "127.0.0.1:${PHALANX_PORT}" --timeout 3 ${PHALANX_HEALTH_ARGS} > /dev/null || exit 1
ENTRYPOINT ["phalanx"]
# Both listeners on every interface: inside a container 127.0.0.1 is reachable from nowhere else (-p maps to eth0).
CMD ["serve", "--models", "/models", "--name", "default", "--host", "0.0.0.0", "--port", "50051", "--metrics-host", "0.0.0.0", "--metrics-port", "9100"]
