# harpe-megatron on an NGC PyTorch image (CUDA, NCCL, Transformer Engine and apex inside).
#
#   docker build -t harpe-megatron .                      # BASE_IMAGE: any NGC PyTorch image with
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 .   # Python 3.12, torch >= 2.13
#
# The image keeps its own torch/CUDA/Triton/TE/apex; every other package is installed at the
# version tested on Python 3.12 from requirements/lock.txt (its 3.12 section: megatron-core 0.19.2,
# transformers 5.24.0, ...), with no dependency resolution. The image's pip constraints file
# (/etc/pip/constraint.txt since NGC 25.03) is bypassed for that step so the lock decides.
# Not built here (no container engine on the development machines); CI checks that the lock's
# Python 3.12 set resolves from the package index (tests/unit/test_dependency_policy.py).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/harpe-megatron
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY scripts ./scripts
COPY harpe_megatron ./harpe_megatron
RUN python -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('.')[:2]); \
sys.exit(0 if sys.version_info[:2] == (3, 12) and v >= (2, 13) else \
f'base image has Python {sys.version.split()[0]} and torch {torch.__version__}; harpe-megatron needs Python 3.12 and torch >= 2.13')" \
 && python scripts/lib/image_requirements.py requirements/lock.txt --python 3.12 > /tmp/requirements.txt \
 && PIP_CONSTRAINT=/dev/null pip install --no-cache-dir --no-deps -r /tmp/requirements.txt \
 && PIP_CONSTRAINT=/dev/null pip install --no-cache-dir --no-deps -e . \
 && python -c "from harpe_megatron.compat import check_megatron; print('megatron-core', check_megatron())"
COPY configs ./configs
COPY tools ./tools
COPY tests ./tests
COPY docs ./docs

ENV PYTHONUNBUFFERED=1
CMD ["bash", "scripts/pretrain_harpe.sh"]
