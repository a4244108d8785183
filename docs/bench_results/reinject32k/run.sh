#!/bin/bash
# GPU: token re-injection at V=32k (standard config, Muon), then isolated timing, then bench_data.
set -u
cd "$(dirname "$0")"
PY=${PY:-python3}
if ls whl/*.whl >/dev/null 2>&1 && [ -z "${ARGS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
$PY -c "import pydantic, httpx, torch; print('deps ok', pydantic.VERSION, httpx.__version__, torch.__version__)" || exit 1
O=${OUT:-/tmp/gpu18out}; mkdir -p $O/g $O/t
STEPS=${STEPS:-500}; ARGS=${ARGS:-}; N=8
EXTRA='[{"boundary":"resbm","variant":"postnorm","token_reinject":true,"seed":1},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":64},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":64,"seed":1},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":256},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":256,"seed":1},
{"boundary":"resbm","variant":"postnorm"},{"boundary":"resbm","variant":"postnorm","seed":1}]'
T='resbm-postnorm@128+tok/muon,resbm-postnorm@128+tok64/muon,resbm-postnorm@128+tok256/muon,resbm-postnorm@128/muon'
ONLY="$T,resbm-postnorm@128+tok/muon/s1,resbm-postnorm@128+tok64/muon/s1,resbm-postnorm@128+tok256/muon/s1,resbm-postnorm@128/muon/s1"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; date -u
for i in $(seq 0 $((N-1))); do
  timeout 430 $PY scripts/bench_compression.py --data bench32k --steps $STEPS --extra "$EXTRA" --only "$ONLY" \
    --shard $i/$N --out $O/g $ARGS > $O/g/log$i.txt 2>&1 &
done
wait; date -u
timeout 150 $PY scripts/bench_compression.py --data bench32k --timing --steps 50 --extra "$EXTRA" --only "$T" --out $O/t $ARGS > $O/t/log.txt 2>&1
date -u
$PY scripts/bench_compression.py --report $O/g --timing-from $O/t > $O/table.txt 2>&1
C=$(ls $O/t/resbm-postnorm-128-tok_muon_*.json | head -1)
$PY scripts/bench_data.py --data bench32k --consumer-json "$C" > $O/bench_data.txt 2>&1
$PY - $O > $O/summary.txt <<'PYEOF'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/[gt]/*.json")):
    r = json.load(open(f))
    print(f.split("/")[-2], r["name"], "val %.4f" % r["final_val"], "params", r["params"], "step_ms", r["step_ms"],
          "peak_gib", r["peak_mem"] and round(r["peak_mem"] / 2**30, 2), "tokens", r["tokens"], r["device"])
PYEOF
cat $O/summary.txt $O/table.txt $O/bench_data.txt; grep -h DONE $O/g/log*.txt $O/t/log.txt
tar czf $O/results.tgz -C $O g t; rm -rf $O/g $O/t; date -u
