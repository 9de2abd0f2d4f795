#!/usr/bin/env bash
# Every check that needs a GPU, as one command, for a machine with a GPU and little time on it:
#
#     bash bench/gpu_checks.sh [WHEELHOUSE]
#
# WHEELHOUSE: a folder of wheels to install the project from where the machine has no package index
# (`pip download -d wheelhouse -e '.[dev]'` on a machine that has one; torch is expected installed).
# 1. the tests that skip without CUDA: the compiled engine with CUDA graphs (zero recompiles, equal to
#    eager in bf16), the bf16 engine against the CPU reference, nvJPEG decoding, device-side normalisation;
# 2. bench/grouped_mm_bench.py: the bank's GEMMs as gathered bmm, torch._grouped_mm over slot segments, dense;
# 3. bench/engine_bench.py on Swin-T, Swin-B and Swin-L (bf16, batch 64, eager and compiled, torch and Triton
#    kernels, 8 and 64 tasks mixed), results in bench/results/engine-swin_<size>-<gpu>.json;
# 4. bench/serve_bench.py on Swin-B (the real server, compiled), in bench/results/serve-<gpu>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0  # a failing check is reported at the end; the ones after it still run
if [ -n "${1:-}" ]; then
    python -m pip install --no-index --find-links "$1" -e '.[dev]' || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m pytest -q -m "" tests/test_compile.py tests/test_engine.py tests/test_decoding.py tests/test_transforms.py -k "cuda" || failed=1
python -m pytest -q -m "" tests/test_mona_kernel.py || failed=1
python bench/grouped_mm_bench.py --device cuda || failed=1
for backbone in swin_tiny_patch4_window7_224 swin_base_patch4_window7_224 swin_large_patch4_window7_224; do
    python bench/engine_bench.py --device cuda --backbone "$backbone" --compile --label "${backbone%%_patch4*}" || failed=1
done
python bench/serve_bench.py --device cuda --tasks 1,8,64 || failed=1
exit $failed
