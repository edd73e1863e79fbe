# The appliance and its LAN worker, one Dockerfile, two targets. The base image is a build argument:
#   DGX-class x86-64 (and arm64 SBSA) GPUs, CUDA 13:   docker build --target appliance -t appliance .
#   DGX Spark (arm64, GB10), CUDA 13:                    the same default base (the CUDA images are multi-arch)
#   Jetson Orin (arm64, JetPack 6.1 = L4T r36.4, CUDA 12.6):
#       docker build --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 --target appliance -t appliance .
#   A LAN worker (any machine; CPU is enough):  docker build --target worker -t appliance-worker .
#   Any Debian or Ubuntu base works the same: `make image` builds both on a debootstrapped Debian with buildah.
# Run:  docker run --gpus all --network host -v appliance-state:/var/lib/appliance appliance
#   (host networking so LAN workers find it by mDNS; the volume keeps its CA, paired devices and keys)
# Installs with the Makefile CI uses (`make deps`, then `make install`); tests/test_docker.py checks that, and hadolint.
# Behind an intercepting proxy, a build passes its CA bundle and apt settings as build secrets, read only by the
# steps that download (never baked in):  --secret id=pip-ca,src=CA.crt --secret id=apt-conf,src=apt.conf
ARG BASE=nvcr.io/nvidia/cuda:13.0.1-runtime-ubuntu24.04

# What every image runs on: the interpreter and the user, no compilers.
FROM ${BASE} AS runtime
# Distribution packages follow the base image's release; pinning them would break every base update.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-conf \
    if [ -f /run/secrets/apt-conf ]; then export APT_CONFIG=/run/secrets/apt-conf; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 appliance \
 && install -d -o appliance -g appliance -m 0700 /var/lib/appliance /var/lib/appliance-worker \
 && install -d -o appliance -g appliance /var/lib/appliance/models
ENV PATH=/opt/venv/bin:$PATH \
    APPLIANCE_HOME=/var/lib/appliance \
    APPLIANCE_WORKER_HOME=/var/lib/appliance-worker

# The dependencies, the cuda extra (pycuda, built from its sdist) included: a layer a code change keeps.
FROM runtime AS deps
# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-conf \
    if [ -f /run/secrets/apt-conf ]; then export APT_CONFIG=/run/secrets/apt-conf; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-dev gcc g++ libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/appliance
COPY pyproject.toml Makefile ./
# EXTRAS= leaves pycuda out (a CPU-only worker; `make image` so builds the arm64 worker, under emulation).
ARG EXTRAS=cuda
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && make deps VENV=/opt/venv EXTRAS="${EXTRAS}" PIP_FLAGS=--no-cache-dir

# The package itself, installed into that environment (its C kernels compiled here).
FROM deps AS build
COPY setup.py README.md ./
COPY appliance appliance
COPY kernels kernels
COPY models models
COPY offload offload
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && make install VENV=/opt/venv PIP_FLAGS=--no-cache-dir

# The default model, verified, so the box starts with no network (fetched by the store's code alone).
FROM deps AS model
COPY models models
RUN --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /opt/venv/bin/python -c "from models.store import ModelStore; print(ModelStore().get())"

# The run-time images: the environment from `deps` (unchanged by a code change), then what `build` added.
FROM runtime AS worker
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/appliance /opt/appliance
USER 10001
VOLUME ["/var/lib/appliance-worker"]
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), 3)"]
ENTRYPOINT ["appliance-worker"]
CMD ["--port", "50051"]

FROM runtime AS appliance
COPY --from=deps /opt/venv /opt/venv
COPY --from=model --chown=10001:10001 /var/lib/appliance/models /var/lib/appliance/models
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/appliance /opt/appliance
USER 10001
VOLUME ["/var/lib/appliance", "/var/lib/appliance/models"]
EXPOSE 8000 8001
# serve listens on 0.0.0.0, so over TLS: the check trusts the appliance's own CA (in the state volume)
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD ["python3", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:8000/v2/health/ready', timeout=3, context=ssl.create_default_context(cafile='/var/lib/appliance/pki/ca.pem'))"]
ENTRYPOINT ["appliance"]
CMD ["serve"]
