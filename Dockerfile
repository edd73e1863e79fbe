# The appliance and its LAN worker, one Dockerfile, two targets. The base image is a build argument:
#   DGX-class x86-64 (and arm64 SBSA) GPUs, CUDA 13:   docker build --target appliance -t appliance .
#   DGX Spark (arm64, GB10), CUDA 13:                    the same default base (the CUDA images are multi-arch)
#   Jetson Orin (arm64, JetPack 6.1 = L4T r36.4, CUDA 12.6):
#       docker build --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 --target appliance -t appliance .
#   A LAN worker (any machine; CPU is enough):  docker build --target worker -t appliance-worker .
# Run:  docker run --gpus all --network host -v appliance-state:/var/lib/appliance appliance
#   (host networking so LAN workers find it by mDNS; the volume keeps its CA, paired devices and keys)
# Installs with the commands CI uses (`make install`, as .ci/run's `make test` does); tests/test_docker.py
# checks that, and hadolint.
ARG BASE=nvcr.io/nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${BASE} AS base
# Distribution packages follow the base image's release; pinning them would break every base update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 appliance \
 && install -d -o appliance -g appliance -m 0700 /var/lib/appliance /var/lib/appliance-worker \
 && install -d -o appliance -g appliance /opt/appliance
WORKDIR /opt/appliance
COPY --chown=appliance:appliance pyproject.toml setup.py README.md Makefile ./
COPY --chown=appliance:appliance appliance appliance
COPY --chown=appliance:appliance kernels kernels
COPY --chown=appliance:appliance models models
COPY --chown=appliance:appliance offload offload
USER 10001
RUN make install VENV=/opt/appliance/.venv
ENV PATH=/opt/appliance/.venv/bin:$PATH \
    APPLIANCE_HOME=/var/lib/appliance \
    APPLIANCE_WORKER_HOME=/var/lib/appliance-worker

FROM base AS worker
VOLUME ["/var/lib/appliance-worker"]
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), 3)"]
ENTRYPOINT ["appliance-worker"]
CMD ["--port", "50051"]

FROM base AS appliance
# The default model is baked in, verified, so the box starts with no network.
RUN appliance-ctl models fetch --local
VOLUME ["/var/lib/appliance", "/var/lib/appliance/models"]
EXPOSE 8000 8001
# serve listens on 0.0.0.0, so over TLS: the check trusts the appliance's own CA (in the state volume)
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD ["python3", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:8000/v2/health/ready', timeout=3, context=ssl.create_default_context(cafile='/var/lib/appliance/pki/ca.pem'))"]
ENTRYPOINT ["appliance"]
CMD ["serve"]
