#!/usr/bin/env bash
# The GPU check of issue 40 in one command, for the device machine (no network there):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu_check"], timeout_s=600)
# Installs the wheels scripts/prepare_gpu_check.sh gathered into .whl/ (SimpleITK travels as an xz tarball of
# its wheel's contents: 28 MB instead of 53), then runs scripts/bench_gpu.py on the carried hippocampus cases
# (.gpu_check/hippocampus). What comes back in $OUT: gpu_check.md (the table), gpu_check.json, gpu_check.log.
# Extra arguments go to bench_gpu.py (e.g. --parts memory throughput).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SITE=${GPU_CHECK_SITE:-/tmp/site}
t0=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 3
fi
for tarball in .whl/*.tar.xz; do
    [ -e "$tarball" ] || continue
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$tarball" "$SITE" || exit 3
done
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
echo "wheels installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$OUT/gpu_check.log"
python3 -c 'import SimpleITK, nibabel, torch, medseg; print("imports ok: torch", torch.__version__, "SimpleITK", SimpleITK.__file__, "nibabel", nibabel.__file__)' 2>&1 | tee -a "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 4
timeout --kill-after=10 560 python3 scripts/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu_check.log"
exit "$rc"
