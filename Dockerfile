# The appliance image for Jetson and DGX-class boxes.
#   DGX / x86_64 or arm64 server GPUs:  docker build -t appliance .
#   Jetson Orin (JetPack 6, L4T r36):   docker build --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 -t appliance .
# Run:  docker run --gpus all --rm appliance generate --chat "Hello!"
# Serve with offload: docker run --gpus all --network host -v appliance:/var/lib/appliance appliance \
#         serve --memory-budget 8GB
#   (host networking so LAN workers find it by mDNS; the volume keeps its CA and paired workers)
ARG BASE=nvcr.io/nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/appliance
COPY pyproject.toml setup.py README.md ./
COPY appliance appliance
COPY kernels kernels
COPY models models
COPY offload offload
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

ENV PATH=/opt/venv/bin:$PATH \
    APPLIANCE_HOME=/var/lib/appliance
# The default model is baked in, verified, so the box starts with no network.
RUN appliance-ctl models fetch

EXPOSE 8000 8001
ENTRYPOINT ["appliance"]
CMD ["generate", "--chat", "Hello! Who are you?"]
