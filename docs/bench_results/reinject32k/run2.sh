#!/bin/bash
# GPU, second call: the two V=32k rows that ran out of memory in run.sh (8 at once), plus a third seed.
set -u
cd "$(dirname "$0")"
PY=${PY:-python3}
if [ -z "${ARGS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpu18out}; mkdir -p $O/g
STEPS=${STEPS:-500}; ARGS=${ARGS:-}; N=4
EXTRA='[{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":64},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":256},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"tok_rank":64,"seed":2},
{"boundary":"resbm","variant":"postnorm","token_reinject":true,"seed":2}]'
ONLY='resbm-postnorm@128+tok64/muon,resbm-postnorm@128+tok256/muon,resbm-postnorm@128+tok64/muon/s2,resbm-postnorm@128+tok/muon/s2'
date -u
for i in $(seq 0 $((N-1))); do
  timeout 400 $PY scripts/bench_compression.py --data bench32k --steps $STEPS --extra "$EXTRA" --only "$ONLY" \
    --shard $i/$N --out $O/g $ARGS > $O/g/log$i.txt 2>&1 &
done
wait; date -u
grep -h "DONE\|Error" $O/g/log*.txt
tar czf $O/results2.tgz -C $O g; rm -rf $O/g
