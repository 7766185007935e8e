# dclip-ray on Ray's GPU image. Ray and Python match the development venv (ray 2.60.0, Python 3.11);
# torch is pinned as in the Makefile. The torch wheels bundle their own CUDA runtime (cu130 builds:
# NVIDIA driver >= 580 on the hosts); the base image's CUDA is only used by Ray's own GPU tooling.
#
#   docker build -t ghcr.io/your-org/dclip-ray:0.1.0 .
#   docker run --gpus all --rm ghcr.io/your-org/dclip-ray:0.1.0 dclip-ray run workflows/toy.yaml
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

ENV HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PIP_NO_CACHE_DIR=1

WORKDIR /home/ray/dclip-ray

# torch first (pinned, from the CUDA index) so no other dependency pulls a different torch
RUN pip install --index-url ${TORCH_INDEX} ${TORCH_SPEC}

# the package (with its bundled presets and toy-world weights); ray itself is already in the image
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dclip_ray ./dclip_ray
RUN pip install . && python -c "import dclip_ray, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# workflow specs: the KubeRay manifests run `dclip-ray run workflows/<spec>.yaml` from this folder
COPY --chown=ray:users workflows ./workflows
