#!/usr/bin/env bash
# mpllama's checks on a machine with a CUDA GPU, in one go (`make gpu-check`):
#   1. what the machine is: the GPU, torch, NCCL;
#   2. every GPU-marked test: the parity tests with cuda ranks (mpllama against
#      transformers), the engine's GPU ranks through Ray, the paged KV cache on a GPU,
#      int8 and int4 weights on torch's CUDA kernels;
#   3. the gpu part of `make bench` (bench_gpu.py): the mixed workload against
#      transformers on the GPU, bf16 and float32, and int8 and int4 weights.
# Output goes to the terminal and, where OUT is set, to $OUT/gpu_check.log.
#
# It runs with the Python on PATH (PYTHON to choose another), which must have a CUDA
# build of torch and transformers. Where it lacks mpllama's other packages and cannot
# reach PyPI, make a folder of their wheels elsewhere (benchmarks/gpu_wheels.py) and
# pass it as WHEELS: they are installed under /tmp/mpllama-site for this run only.
# The exit status is the tests'; the bench only reports.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:+$OUT/gpu_check.log}
exec > >(tee ${LOG:-/dev/null}) 2>&1

if [ -n "${WHEELS:-}" ]; then
    SITE=/tmp/mpllama-site
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

echo "== the machine"
nvidia-smi -L || true
$PY - <<'EOF' || exit 1
import torch, torch.distributed as dist
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
      f"NCCL {'yes' if dist.is_nccl_available() else 'no'}")
EOF

echo "== the GPU-marked tests"
# Only the files that hold them: the others import packages (openai, llama-models) that
# a GPU image need not have.
files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
$PY -m pytest -q -m gpu -p no:cacheprovider -rs $files
status=$?

echo "== the gpu part of make bench"
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $PY benchmarks/bench.py --only gpu ${BENCH_ARGS:-}
exit $status
