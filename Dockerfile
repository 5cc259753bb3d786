# harpe-megatron on an NGC PyTorch image (CUDA, NCCL, Transformer Engine and apex inside).
# 25.04 ships Python 3.12 and PyTorch 2.7 with TE; megatron-core 0.16.1 is installed by pip below.
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/harpe-megatron
COPY pyproject.toml README.md ./
COPY harpe_megatron ./harpe_megatron
RUN pip install --no-cache-dir -e ".[logging]"
COPY configs ./configs
COPY scripts ./scripts
COPY tools ./tools
COPY tests ./tests
COPY docs ./docs

ENV PYTHONUNBUFFERED=1
CMD ["bash", "scripts/pretrain_harpe.sh"]
