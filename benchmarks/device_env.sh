# Sourced by the one-call GPU scripts (benchmarks/*_gpu*.sh): unpacks the carried .devbundle
# (../shared/DEVICE.md) and sets the environment every pdserve run on a lent GPU machine needs.
mkdir -p /tmp/site
tar xJf .devbundle/site.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled UCX_NET_DEVICES=lo \
  NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
