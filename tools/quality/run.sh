#!/usr/bin/env bash
# Measures every row of docs/quality.md: the same 1,000 world captions (prompt seed 5000) and noise seeds
# (batches of 100, seed 0 + batch index) for each sampler, scored by `fewstep eval` against 2,000 real
# pictures. Usage: tools/quality/run.sh FEWSTEP_BIN CLASSIFIER LCM_FOLDER LCM_LORA OUT_DIR [COUNT]
# Then: python3 tools/quality/table.py OUT_DIR
set -euo pipefail
bin=$1 classifier=$2 lcm=$3 lora=$4 out=$5 count=${6:-1000}
base=models/default/base outline=models/default/outline
mkdir -p "$out"
row() { # NAME ARGS…
  local name=$1; shift
  [ -f "$out/$name.json" ] && return 0
  "$bin" eval --classifier "$classifier" --count "$count" --batch 100 --json "$out/$name.json" \
    --samples "$out/$name.png" "$@"
}
row teacher-ddim50 --model $base --scheduler ddim --steps 50 --guidance 3
row teacher-ddim4 --model $base --scheduler ddim --steps 4 --guidance 3
row teacher-dpm4 --model $base --scheduler dpm++ --steps 4 --guidance 3
for n in 1 2 4 8; do
  row lcm-$n --model "$lcm" --scheduler lcm --steps $n --guidance 3
  row lcm-lora-$n --model $base --lora "$lora" --scheduler lcm --steps $n --guidance 1
done
row outline-lcm-lora-4 --model $outline --lora "$lora" --scheduler lcm --steps 4 --guidance 1 --style outline
row outline-ddim50 --model $outline --scheduler ddim --steps 50 --guidance 3 --style outline
