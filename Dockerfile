# Phalanx inference service (and trainer) image, CPU build.
#   docker build -t phalanx .
#   docker run -p 50051:50051 -p 9100:9100 -v $PWD/models:/models phalanx \
#       serve --models /models --name 3m --host 0.0.0.0 --port 50051 --metrics-port 9100
# The model repository is a mounted volume; the service polls it and swaps in new versions live.
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
# gRPC health check (grpc.health.v1) through the client library
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
c=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); \
sys.exit(0 if c.Check(h.HealthCheckRequest(), timeout=2).status==1 else 1)"
ENTRYPOINT ["phalanx"]
CMD ["serve", "--models", "/models", "--name", "default", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100"]
