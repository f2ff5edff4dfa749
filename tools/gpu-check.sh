#!/usr/bin/env bash
# Everything decima checks on the GPU machine, in one call of the device tool (few, full calls):
#   tools/gpu-check.sh [tests] [parity] [bench] [quant] [fusions] [calls] [serve] [kernels] [profile] [timeline] [anchors]
#     [compile] [fixtures]
#   (profile after quant also profiles the int4 engine; fusions and calls need quant's engines)
# It expects the build from this machine carried along: dist/, build/native/decima.node, .device/ (node),
# .carry/node_modules (production dependencies). Logs and results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source .device/env.sh
[ -e node_modules ] || ln -s .carry/node_modules node_modules
OUT=${OUT:-/tmp/decima-out}
mkdir -p "$OUT"
sections=${*:-tests parity bench anchors}
cli="node dist/src/cli/main.js"
model=/tmp/decicoder-1b
has() { [[ " $sections " == *" $1 "* ]]; }
step() { echo; echo "== $* ($(date +%T))"; }

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv,noheader

if has tests; then
  step "GPU tests"
  node --test --test-reporter=spec dist/test/cuda-kernels.test.js dist/test/cuda-backend.test.js 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "^\s*(✔|✖|ℹ)|Error|error" | head -80
fi

if has parity || has bench || has anchors || has profile || has quant || has serve || has compile; then
  step "create a decicoder-1b-shaped model"
  [ -d $model ] || /usr/bin/time -f "%e s, %M KB" $cli create-model --preset decicoder-1b --out $model
fi

if has fixtures; then
  step "Hugging Face golden fixtures for the tiny presets"
  for p in tiny decilm-tiny; do
    $cli create-model --preset $p --out /tmp/$p --seed 0 > /dev/null
    python3 tools/hf_reference.py --model /tmp/$p --prompt-len 32 --gen 32 --tokens-seed 1 --out "$OUT/hf-$p.json"
  done
  python3 tools/hf_reference.py --model /tmp/tiny --check-reference
  python3 tools/hf_tokenizer_golden.py /tmp/tiny test/fixtures/tokenizer-cases.json "$OUT/tokenizer-golden.json"
fi

if has parity; then
  step "logits against Hugging Face (decicoder-1b shape, 64 positions)"
  for dt in bfloat16 float16; do
    python3 tools/hf_reference.py --model $model --prompt-len 64 --gen 0 --dtype float32 --compare-decima $dt 2>&1 | grep -v Warning
  done
  python3 tools/hf_reference.py --model $model --prompt-len 64 --gen 0 --dtype bfloat16 --compare-decima bfloat16 2>&1 | grep -v Warning
fi

if has bench; then
  step "decima bench"
  $cli bench --model $model --device cuda --batch 1,8,32 --prompt-len 128 --gen-len 256 | tee "$OUT/bench-decode.txt"
  $cli bench --model $model --device cuda --batch 1 --prompt-len 1024 --gen-len 1 --repeat 5 | tee "$OUT/bench-prefill.txt"
  step "decima generate, 100 new tokens after a short prompt"
  for i in 1 2; do
    /usr/bin/time -f "wall %e s" $cli generate --model $model --device cuda --prompt "def fib(n):" --max-tokens 100 --ignore-eos --json \
      | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);console.log(JSON.stringify({tokens:j.tokens.length,timings:j.timings}))})'
  done
fi

if has quant; then
  step "engines: 16-bit, int8, int4 (decima build), accuracy and load time"
  for q in none int8 int4; do
    [ -d /tmp/dc1b-$q ] || /usr/bin/time -f "build $q: %e s, %M KB" $cli build --model $model --out /tmp/dc1b-$q --quant $q --dtype bfloat16 2>&1 | tail -2
  done
  node dist/bench/quant-accuracy.js /tmp/dc1b-none /tmp/dc1b-none /tmp/dc1b-int8 /tmp/dc1b-int4 2>&1 | tee "$OUT/quant-accuracy.txt"
  for q in int8 int4; do
    $cli bench --model /tmp/dc1b-$q --device cuda --batch 1 --prompt-len 128 --gen-len 256 | tail -2 | tee -a "$OUT/bench-quant.txt"
  done
  step "longer contexts: prompts of 1,536 tokens, then 256 decode steps"
  for q in none int8 int4; do
    $cli bench --model /tmp/dc1b-$q --device cuda --batch 1,2 --prompt-len 1536 --gen-len 256 | tail -3 | tee -a "$OUT/bench-long.txt"
  done
fi

if has fusions; then
  step "int4 decode steps with the fused MLP and O projection off, then on, alternated"
  for r in 1 2; do
    for off in 1 0; do
      echo "fusions $([ $off = 1 ] && echo off || echo on), run $r"
      DECIMA_FUSED_MLP=$((1 - off)) DECIMA_FUSED_O=$((1 - off)) $cli bench --model /tmp/dc1b-int4 --device cuda --batch 1,2,4,8 --prompt-len 128 --gen-len 256 \
        | tail -4 | tee -a "$OUT/bench-fusions.txt"
    done
  done
fi

if has calls; then
  step "the host's turn between backend calls: int4 one-row steps at 1 to 16 decode steps a call"
  for r in 1 2; do
    for k in 1 2 4 8 16; do
      echo "$k steps a call, run $r" | tee -a "$OUT/bench-calls.txt"
      $cli bench --model /tmp/dc1b-int4 --device cuda --batch 1 --prompt-len 128 --gen-len 256 --decode-steps $k | tail -2 | tee -a "$OUT/bench-calls.txt"
    done
  done
fi

if has serve; then
  step "server: concurrent streaming clients (server and load generator in separate processes)"
  started=$(date +%s.%N)
  $cli serve --model $model --device cuda --port 8123 > "$OUT/serve.log" 2>&1 &
  server=$!
  for i in $(seq 240); do
    node -e 'fetch("http://127.0.0.1:8123/health").then(r=>process.exit(r.ok?0:1),()=>process.exit(1))' && break
    sleep 0.25
  done
  echo "server ready in $(python3 -c "print(round($(date +%s.%N) - $started, 2))") s (load, and every batch size's decode graph)"
  $cli bench-serve --url http://127.0.0.1:8123 --clients 64 --requests 64 --prompt-len 512 --gen-len 128 > /dev/null  # warm-up
  $cli bench-serve --url http://127.0.0.1:8123 --clients 64 --requests 512 --prompt-len 512 --gen-len 128 | tee "$OUT/bench-serve.txt"
  $cli bench-serve --url http://127.0.0.1:8123 --clients 64 --requests 2048 --prompt-len 512 --gen-len 128 --ramp-up 1 | tee -a "$OUT/bench-serve.txt"
  $cli bench-serve --url http://127.0.0.1:8123 --clients 64 --requests 512 --prompt-len 512 --gen-len 128 --shared-prefix 400 | tee -a "$OUT/bench-serve.txt"
  $cli bench-serve --url http://127.0.0.1:8123 --clients 64 --requests 2048 --prompt-len 512 --gen-len 128 --shared-prefix 400 --ramp-up 1 | tee -a "$OUT/bench-serve.txt"
  for editors in 1 4; do  # editors' /infill requests, as llama.vscode sends them: time to first token
    $cli bench-serve --url http://127.0.0.1:8123 --workload infill --clients $editors --requests $((50 * editors)) --prompt-len 512 --gen-len 64 | tee -a "$OUT/bench-serve.txt"
  done
  kill $server
  wait $server 2>/dev/null
  step "the same load on a simulated device (the host's share alone)"
  node dist/bench/serve-host.js -- --clients 64 --requests 512 --prompt-len 512 --gen-len 128 --ramp-up 1 | tee -a "$OUT/bench-serve.txt"
  node dist/bench/serve-host.js -- --workload infill --clients 4 --requests 200 --prompt-len 512 --gen-len 64 | tee -a "$OUT/bench-serve.txt"
fi

if has compile; then
  step "anchors: torch.compile"
  python3 bench/torch_anchors.py --model $model --batch 1 32 --prompt-len 128 --gen-len 256 --compile 2>&1 | grep -v Warning | tail -8 | tee -a "$OUT/anchors.jsonl"
fi

if has kernels; then
  step "GEMV kernels alone (graphs of 200 launches, weights rotating past L2)"
  node dist/bench/gemv-kernels.js --quant | tee "$OUT/gemv-kernels.txt"
fi

if has profile; then
  step "per-kernel profile (eager launches, events between kernels)"
  for b in 1 32; do
    DECIMA_PROFILE=1 $cli bench --model $model --device cuda --batch $b --prompt-len 128 --gen-len 64 --repeat 1 2>&1 | tail -22 | tee -a "$OUT/profile.txt"
  done
  if [ -d /tmp/dc1b-int4 ]; then  # made by the quant section
    DECIMA_PROFILE=1 $cli bench --model /tmp/dc1b-int4 --device cuda --batch 1 --prompt-len 128 --gen-len 64 --repeat 1 2>&1 | tail -22 | tee -a "$OUT/profile.txt"
  fi
fi

if has timeline; then
  step "one int4 decode step inside its graph, kernel by kernel (Nsight Systems)"
  nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  if [ -z "$nsys" ]; then
    echo "no nsys on this machine"
  else
    [ -d $model ] || $cli create-model --preset decicoder-1b --out $model > /dev/null
    [ -d /tmp/dc1b-int4 ] || $cli build --model $model --out /tmp/dc1b-int4 --quant int4 --dtype bfloat16 > /dev/null
    "$nsys" profile --cuda-graph-trace=node --trace=cuda --force-overwrite true --output "$OUT/timeline" \
      $cli bench --model /tmp/dc1b-int4 --device cuda --batch 1 --prompt-len 128 --gen-len 256 --repeat 1 > /dev/null
    "$nsys" stats --report cuda_gpu_trace --format csv --force-export true --output "$OUT/timeline" "$OUT/timeline.nsys-rep" > /dev/null
    python3 tools/timeline.py "$OUT/timeline_cuda_gpu_trace.csv" | tee "$OUT/timeline.txt"
  fi
fi

if has anchors; then
  step "anchors: transformers eager"
  python3 bench/torch_anchors.py --model $model --batch 1 32 --prompt-len 128 --gen-len 256 2>&1 | grep -v Warning | tee "$OUT/anchors.jsonl"
fi
