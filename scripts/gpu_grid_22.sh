#!/usr/bin/env bash
# Issue 22's GPU checks in one device call, raw outputs under $OUT (default ./gpu-out):
#   (a) scripts/bench_transfer.py: 256 KiB and 256 MiB objects, the miner's path against boto3's
#       transfer manager, one rclone serve s3 on loopback (rclone from the wheel bundle);
#   (b) scripts/bench_gpu_subnet.py --preset 1b: the reference trainer (128K tokens a step,
#       compiled) then the whole subnet on this host's GPU, >= 5 minutes of training.
# Usage: bash scripts/gpu_grid_22.sh [all|transfer|subnet] [extra bench_gpu_subnet flags...]
# Budget (one 10-minute call): transfer ~0.5 min (at most 150 s), reference ~1.5 min, subnet start
# ~0.5 min, SUBNET_SECONDS of training (300), catch-up 30 s, shutdown ~0.3 min: about 8.5 minutes;
# the subnet gets whatever is left of 585 s. TRANSFER_ARGS replaces the transfer bench's flags.
set -uo pipefail
what="${1:-all}"; shift || true
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off in every process started here
if [ -f .gpu_stage/site.tar.xz ]; then  # the packages the CUDA image lacks (docs/GPU_HOST.md)
    mkdir -p /tmp/site && tar xJf .gpu_stage/site.tar.xz -C /tmp/site
    [ -f .gpu_stage/extra.tar.xz ] && tar xJf .gpu_stage/extra.tar.xz -C /tmp/site  # e.g. tokenizers
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc;
  "$PY" -c 'import torch, urllib3; print("torch", torch.__version__, "urllib3", urllib3.__version__)';
  command -v rclone && rclone version | head -1; } > "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"
rc=0
if [ "$what" = all ] || [ "$what" = transfer ]; then
    echo "=== (a) transfers: the miner's path vs boto3's transfer manager ==="
    # shellcheck disable=SC2086
    timeout 150 "$PY" scripts/bench_transfer.py ${TRANSFER_ARGS:---repeats 5} 2>&1 | tee "$OUT/transfer.txt"
    rc=$(( rc | ${PIPESTATUS[0]} ))
fi
if [ "$what" = all ] || [ "$what" = subnet ]; then
    echo "=== (b) the subnet at 1B against the reference trainer ==="
    tol=""
    for f in docs/bench_results/audit_calibration_1b_h100/audit_tolerances_1b_h12.yaml \
             docs/bench_results/audit_calibration*/audit_tolerances_1b*.yaml \
             docs/bench_results/audit_calibration/audit_tolerances_h200_standard.yaml; do
        [ -f "$f" ] && { tol="--audit-tolerances $f"; break; }
    done
    echo "audit tolerances: ${tol:-none (the fallback constants)}"
    # shellcheck disable=SC2086
    timeout $(( 585 - SECONDS )) "$PY" scripts/bench_gpu_subnet.py --preset 1b --seconds "${SUBNET_SECONDS:-300}" \
        --catch-up-seconds 30 --reference-steps 10 $tol --workdir /tmp/gsn --out "$OUT/gpu_subnet.json" "$@" \
        2>&1 | tee "$OUT/gpu_subnet.txt"
    rc=$(( rc | ${PIPESTATUS[0]} ))
    [ -d /tmp/gsn ] && tar czf "$OUT/gsn_logs.tgz" -C /tmp/gsn logs run.yaml 2>/dev/null
fi
exit "$rc"
