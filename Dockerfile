# syntax=docker/dockerfile:1
# The image every KFP component of the pipeline runs on: spo-pipeline installed non-editable with kfp and
# kfp-kubernetes, so nothing is installed at run time. Two variants (README, "Container image"):
#   GPU (sd15, sdxl), the default: pytorch/pytorch's runtime image, whose torch 2.13.0 (CUDA 13.0) is kept
#     docker build -t ghcr.io/spo-pipeline/spo:0.1.0-cuda .
#   CPU (digits): python:3.12-slim plus torch 2.13.0 from PyTorch's CPU index
#     docker build --build-arg BASE_IMAGE=python:3.12-slim \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ghcr.io/spo-pipeline/spo:0.1.0-cpu .
# The install steps are docker/install.sh, which CI also runs outside Docker (docker/check_install.sh).

ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# read by docker/install.sh; an empty TORCH_INDEX keeps the base image's torch of that version
ARG TORCH_INDEX=""
ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="spo-pipeline" \
      org.opencontainers.image.description="Step-by-step Preference Optimization (SPO) pipeline stages for Kubeflow Pipelines"

# SPO_MOUNT: where the pipeline mounts its ReadWriteMany PVC (cluster.mount_path), with the Hugging Face
# cache (hf/) and the training checkpoints (checkpoints/) under it. SPO_ASSET_ROOT: the installed copy of
# profiles/ and configs/ (spo/asset_paths.py).
ENV PYTHONUNBUFFERED=1 \
    SPO_ASSET_ROOT=/opt/spo-pipeline \
    SPO_MOUNT=/mnt/spo \
    HF_HOME=/mnt/spo/hf

# uid/gid 1000, given numerically to USER below so that Kubernetes' runAsNonRoot can verify it; a base
# image's own uid-1000 user (Ubuntu 24.04's `ubuntu`) makes way. The mount point and its two directories
# exist and belong to spo, so the image also runs without a PVC (the cache is then the pod's own).
RUN if user="$(id -nu 1000 2>/dev/null)"; then userdel "$user"; fi \
    && if group="$(getent group 1000)"; then groupdel "${group%%:*}"; fi \
    && groupadd --gid 1000 spo \
    && useradd --uid 1000 --gid 1000 --create-home --no-log-init --shell /bin/bash spo \
    && mkdir -p /mnt/spo/hf /mnt/spo/checkpoints /workspace \
    && chown -R 1000:1000 /mnt/spo /workspace

# the build context is an allowlist (.dockerignore); the source is removed once installed, so no
# `import spo` can pick it up instead of the installed package
COPY . /tmp/spo-src
RUN PIP_ROOT_USER_ACTION=ignore bash /tmp/spo-src/docker/install.sh /tmp/spo-src \
    && rm -rf /tmp/spo-src

# The KFP backend mounts emptyDir volumes at /gcs, /minio, /s3, /.local, /.cache and /.config of every
# component container, so its launcher writes nowhere else that a non-root user could not.
WORKDIR /workspace
USER 1000:1000

# the installed package finds its profiles and accelerate config as the spo user, and kfp imports
RUN spo profile list \
    && python -c "import components.stages, pipelines.spo_pipeline, spo.stages.stage_cli as s; assert s.DEFAULT_ACCELERATE_CONFIG.is_file()"

CMD ["spo", "--help"]
