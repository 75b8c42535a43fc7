#!/usr/bin/env bash
# Issue 5's H100 numbers in one device session (~25 min of the 30): kernel checks, the llama-8b packages,
# the end-to-end runs. Runs ON the GPU machine from the project root; everything lands in $OUT.
#   bash scripts/gpu_quant_session.sh build [WHEELS]  the first call, with ../shared/gpu/DEVICE.md's first
#                   install part: onnxopt (pip -e) and nvmath-python (carry WHEELS, default `.whl`, made here
#                   by `pip download --no-deps nvmath-python==1.0.1 -d .whl` for cp312 manylinux), then the
#                   llama-8b build in the background (~13 min; export, optimize and quantize need no
#                   onnxruntime-gpu, so it runs while the other four install calls come)
#   bash scripts/gpu_quant_session.sh start           after the fifth install call: setup, the GPU tests of
#                                                     the kernels (~5 min, two cores; the build has the rest)
#   bash scripts/gpu_quant_session.sh probe           the fp8 GEMM chain per SwiGLU path, and with fast
#                                                     accumulation (its error against float32 promotion) (~3 min)
#   bash scripts/gpu_quant_session.sh probe-decode    the half2 GEMV plans and the decode attention's U (~4 min)
#   bash scripts/gpu_quant_session.sh wait [SECONDS]  poll the build (default 500 s; one call holds the machine)
#   bash scripts/gpu_quant_session.sh bench           fp16 / fp8 / int4-wo at 2048 -> 8 and 128 -> 128 (~6 min)
#   bash scripts/gpu_quant_session.sh bench-prefetch  int4-wo 128 -> 128 with ONNXOPT_L2_PREFETCH_MB 0/8/16/32 (~2 min)
#   bash scripts/gpu_quant_session.sh bench-autotune  fp16 / fp8 at 2048 -> 8 with ONNXOPT_FP8_AUTOTUNE=1 (~3 min)
#   bash scripts/gpu_quant_session.sh bench-fastaccum fp16 / fp8 at 2048 -> 4 with ONNXOPT_FP8_FAST_ACCUM 0 1 0 1 (~7 min)
#   bash scripts/gpu_quant_session.sh bench-plans     int4 128 -> 128 with ONNXOPT_GEMV_PLANS overrides (~4 min)
#   bash scripts/gpu_quant_session.sh bench-residency int4 128 -> 128 with ONNXOPT_GEMV_MIN_BLOCKS / BLOCKS_PER_SM 2/2, 3/2, 3/3, 2/0 (~4 min)
#   bash scripts/gpu_quant_session.sh probe-sums      the int4 GEMV chain (8 layers + head) per ONNXOPT_GEMV_SUMS (~1 min)
#   bash scripts/gpu_quant_session.sh bench-sums      int4 128 -> 128 with ONNXOPT_GEMV_SUMS word / chunk / word / chunk (~2 min)
#   bash scripts/gpu_quant_session.sh bench-parts     int4 128 -> 128 with ONNXOPT_GEMV_PART_BUFFERS 1 / 2 / 1 / 2 (~2 min)
#   bash scripts/gpu_quant_session.sh probe-gemv "SETTINGS" ...  the int4 GEMV chain (8 layers + head, synthetic
#                   weights, no build) once per SETTINGS (env assignments, "" the defaults), then again (~20 s each)
#   bash scripts/gpu_quant_session.sh bench-gemv "SETTINGS" ...  int4 128 -> 128 per SETTINGS, twice over (~30 s each)
#   bash scripts/gpu_quant_session.sh bench-decode    fp16 and int4-wo 128 -> 128 in one process (~1.5 min)
#   bash scripts/gpu_quant_session.sh tests [ARGS]    after start: pytest ARGS (default the GEMV settings tests,
#                   which rebuild the kernels in subprocesses and which start leaves out) (~4 min)
#   bash scripts/gpu_quant_session.sh bench-prefill-form  fp16 / fp8 (the default: SwiGLU-input prefill form) /
#                   fp8 with ONNXOPT_FP8_SWIGLU_INPUT 0 and 1 at 2048 -> 16 (~4 min)
#   bash scripts/gpu_quant_session.sh prefill-profile the 2048-token prefill's kernels, fp16 and fp8 (~3 min)
#   bash scripts/gpu_quant_session.sh stash           keep the carried `.gpu/fa*/part.*` (any call may carry one)
#   bash scripts/gpu_quant_session.sh eval-fastaccum  SmolLM2 fp8 perplexity through the CUDA runtime with
#                   ONNXOPT_FP8_FAST_ACCUM 0 and 1 (~2 min). The package and the evaluation text come as
#                   parts made here by `bash scripts/gpu_quant_session.sh pack-eval PKG TEXT` (PKG an fp8
#                   `--target cuda --full-logits` package), one `.gpu/faN` a call, each run through `stash`
#   bash scripts/gpu_quant_session.sh quick [TESTS]   instead of build/start, after the five install calls
#                   (carry .whl): setup and the GPU tests named, default tests/gpu/test_linear_fp8.py (~2 min)
#   bash scripts/gpu_quant_session.sh eval-defaults   as eval-fastaccum: the defaults, then ONNXOPT_FP8_SWIGLU_INPUT=0,
#                   ONNXOPT_FP8_FAST_ACCUM=0 and both (~1 min)
#   bash scripts/gpu_quant_session.sh decode-accuracy as eval-fastaccum with an int4-wo package (full logits): the
#                   decode step's logits against the prefill's over the same tokens, ONNXOPT_GEMV_SUMS word and chunk (~1 min)
# The machine goes back after 30 s without a call: keep the calls coming.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
cache=${ONNXOPT_CACHE:-/tmp/onnxopt-bench}/llama-8b
case "${1:?build|start|probe|probe-decode|wait|bench|bench-prefetch|bench-autotune|bench-fastaccum|bench-plans|bench-residency|bench-sums|bench-parts|probe-sums|probe-gemv|bench-gemv|bench-decode|tests|bench-prefill-form|prefill-profile|pack-eval|stash|eval-fastaccum|eval-defaults|decode-accuracy|quick}" in
build)
  wheels=${2:-.whl}
  [ -d /tmp/nvsite/nvmath ] || python3 -m pip install -q --no-index --no-deps --target /tmp/nvsite "$wheels"/nvmath_python-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/onnxopt-pip.log 2>&1 \
    || { tail /tmp/onnxopt-pip.log; exit 1; }
  # the image's own packages (CPU onnxruntime) until start: gpu_setup.sh rewrites this file
  printf 'export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1\n' > /tmp/onnxopt-env.sh
  [ -f /tmp/prepare-llama-8b.log ] || FP8=1 GENAI=0 bash scripts/gpu_prepare.sh llama-8b 2-15 "4" cuda
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
  ;;
start)
  [ -f /tmp/site/.installed ] || { echo "onnxruntime-gpu is not in /tmp/site: run the DEVICE.md install first" >&2; exit 1; }
  [ -d /tmp/nvsite/nvmath ] || python3 -m pip install -q --no-index --no-deps --target /tmp/nvsite .whl/nvmath_python-*.whl
  SKIP_EXPORT_CHECK=1 bash scripts/gpu_setup.sh > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
  echo 'export PYTHONPATH=$PYTHONPATH:/tmp/nvsite' >> /tmp/onnxopt-env.sh
  . /tmp/onnxopt-env.sh
  tail -3 "$out/setup.log"
  [ -f /tmp/prepare-llama-8b.log ] || FP8=1 GENAI=0 bash scripts/gpu_prepare.sh llama-8b 2-15 "4" cuda
  # two cores for the checks, the other 14 build
  # (the tests that rebuild the GEMV under other settings in subprocesses run in `tests`, after)
  taskset -c 0-1 timeout 500 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py tests/gpu/test_linear_fp8.py \
    -k "not launch_settings and not other_sums_mode" > "$out/gpu-tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$out/gpu-tests.log")"; grep -E "^FAILED" "$out/gpu-tests.log" | head -20
  tail -2 /tmp/prepare-llama-8b.log
  ;;
quick)  # a session without the llama-8b build: setup, then the GPU tests named (default the fp8 ones)
  [ -f /tmp/site/.installed ] || { echo "onnxruntime-gpu is not in /tmp/site: run the DEVICE.md install first" >&2; exit 1; }
  [ -d /tmp/nvsite/nvmath ] || python3 -m pip install -q --no-index --no-deps --target /tmp/nvsite .whl/nvmath_python-*.whl
  SKIP_EXPORT_CHECK=1 bash scripts/gpu_setup.sh > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
  echo 'export PYTHONPATH=$PYTHONPATH:/tmp/nvsite' >> /tmp/onnxopt-env.sh
  . /tmp/onnxopt-env.sh
  shift; [ $# -gt 0 ] || set -- tests/gpu/test_linear_fp8.py
  timeout 400 python3 -m pytest -q -p no:cacheprovider "$@" > "$out/gpu-tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$out/gpu-tests.log")"; grep -E "^FAILED" "$out/gpu-tests.log" | head -20
  ;;
probe)
  . /tmp/onnxopt-env.sh
  # the layer's projections back to back at 2048 rows, per path, then with fast accumulation: its error against float32
  # promotion per projection (fast_accum_vs_exact) and its fp8_vs_fp16_rel_l2 against the first run's
  taskset -c 0-1 timeout 200 python3 scripts/gpu_fp8_gemm_probe.py --rows 2048 --repeats 10 --chain 10 \
    > "$out/fp8-probe.txt" 2>&1
  echo "fp8 probe rc $?"; grep -E "^  gate_up|back to back" "$out/fp8-probe.txt" | cut -c1-400
  taskset -c 0-1 timeout 200 python3 scripts/gpu_fp8_gemm_probe.py --rows 2048 --repeats 10 --chain 10 --fast-accum \
    > "$out/fp8-probe-fastaccum.txt" 2>&1
  echo "fp8 probe, fast accumulation: rc $?"; tail -1 "$out/fp8-probe-fastaccum.txt"
  grep -h "fast_accum_vs_exact" "$out/fp8-probe-fastaccum.txt" | cut -c1-200
  grep -ho '"projection": "[a-z_]*", "kind": "fp8", .*"fp8_vs_fp16_rel_l2": [0-9.]*' "$out"/fp8-probe*.txt \
    | sed 's/"kind".*rel_l2"/rel_l2/'
  tail -2 /tmp/prepare-llama-8b.log
  ;;
probe-decode)
  . /tmp/onnxopt-env.sh
  taskset -c 0-1 timeout 200 python3 scripts/gpu_linear_probe.py --hidden 4096 --intermediate 14336 --layers 8 \
    --replays 20 --bits 4 --plans > "$out/linear-probe.txt" 2>&1
  echo "linear probe rc $?"; grep -E '"chosen": true|projections_us' "$out/linear-probe.txt"
  taskset -c 0-1 timeout 100 python3 scripts/gpu_gqa_probe.py --heads 32 --kv-heads 8 --head-size 128 --tmax 256 1280 \
    --layers 32 --round-rows 2 4 8 --threads 256 512 > "$out/gqa-probe.txt" 2>&1
  echo "gqa probe rc $?"; cut -c1-200 "$out/gqa-probe.txt"
  ;;
wait)
  limit=${2:-500}; t=0
  while [ $t -lt "$limit" ] && [ ! -f /tmp/prepare-llama-8b.done ] && [ ! -f /tmp/prepare-llama-8b.failed ]; do
    sleep 10; t=$((t + 10))
  done
  date -u +%H:%M:%S; ls /tmp/prepare-llama-8b.done /tmp/prepare-llama-8b.failed 2>/dev/null; df -h /tmp | tail -1
  grep -v "^\s*$" /tmp/prepare-llama-8b.log | tail -6; cp /tmp/prepare-llama-8b.log "$out/"
  ;;
bench)
  . /tmp/onnxopt-env.sh
  for run in "2048 8 onnxopt-cuda,onnxopt-cuda-fp8-swiglu-in,onnxopt-cuda-fp8,onnxopt-cuda-int4wo-half2" \
             "128 128 onnxopt-cuda,onnxopt-cuda-int4wo-half2"; do
    set -- $run
    python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens "$1" --new-tokens "$2" --repeats 2 \
      --engines "$3" --out "$out" > "$out/bench-$1-$2.txt" 2> "$out/bench-$1-$2.log"
    echo "bench $1 -> $2 rc $?"; tail -6 "$out/bench-$1-$2.txt"
  done
  ;;
bench-prefetch)
  . /tmp/onnxopt-env.sh
  # int4 decode with each op part prefetching up to MB of the next weights into L2 (runtime/device_graph.py)
  for mb in 0 8 16 32; do
    ONNXOPT_L2_PREFETCH_MB=$mb python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 128 \
      --new-tokens 128 --repeats 3 --engines onnxopt-cuda-int4wo-half2 --out "$out/prefetch-$mb" \
      > "$out/bench-int4-prefetch-$mb.txt" 2> "$out/bench-int4-prefetch-$mb.log"
    echo "int4 128 -> 128, L2 prefetch $mb MB: rc $? $(tail -1 "$out/bench-int4-prefetch-$mb.txt" | cut -c1-140)"
  done
  ;;
bench-autotune)
  . /tmp/onnxopt-env.sh
  ONNXOPT_FP8_AUTOTUNE=1 python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 2048 --new-tokens 8 \
    --repeats 2 --engines onnxopt-cuda,onnxopt-cuda-fp8-swiglu-in,onnxopt-cuda-fp8 --out "$out/autotune" \
    > "$out/bench-2048-8-autotune.txt" 2> "$out/bench-2048-8-autotune.log"
  echo "bench 2048 -> 8, fp8 GEMMs autotuned: rc $?"; tail -4 "$out/bench-2048-8-autotune.txt"
  ;;
bench-fastaccum)
  . /tmp/onnxopt-env.sh
  # fast accumulation off / on / off / on, each process timing fp16 and fp8 (SwiGLU on down's input) at
  # 2048 -> 4: one process each gave 1.42x and 1.20x on 2026-12-06, so the ratio is taken per process
  for fa in 0 1 0 1; do
    ONNXOPT_FP8_FAST_ACCUM=$fa python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 2048 \
      --new-tokens 4 --repeats 3 --engines onnxopt-cuda,onnxopt-cuda-fp8-swiglu-in --out "$out" \
      > "$out/fa.txt" 2>> "$out/bench-fastaccum.log"
    echo "fast accumulation $fa: rc $?"; tail -2 "$out/fa.txt" | cut -c1-150
    grep -h "first token" "$out/bench-fastaccum.log" | tail -6 | sed 's/^.*: run/  run/'
  done
  ;;
bench-residency)
  . /tmp/onnxopt-env.sh
  # the GEMV's launch bounds (custom_ops/linear_half2.py MIN_BLOCKS) and its persistent grid, in the captured step
  for mb_bps in "2 2" "3 2" "3 3" "2 0"; do
    set -- $mb_bps
    ONNXOPT_GEMV_MIN_BLOCKS=$1 ONNXOPT_GEMV_BLOCKS_PER_SM=$2 python3 scripts/bench_decode.py --device cuda --model llama-8b \
      --prompt-tokens 128 --new-tokens 128 --repeats 3 --engines onnxopt-cuda-int4wo-half2 --out "$out" \
      > "$out/residency.txt" 2>> "$out/bench-residency.log"
    echo "min blocks $1, blocks per SM $2: rc $? $(tail -1 "$out/residency.txt" | cut -c1-130)"
  done
  ;;
tests)  # after start: pytest with the arguments given, default the GEMV settings tests start leaves out
  . /tmp/onnxopt-env.sh; shift; [ $# -gt 0 ] || set -- tests/gpu/test_kernels.py -k "launch_settings or other_sums_mode"
  taskset -c 0-1 timeout 560 python3 -m pytest -q -p no:cacheprovider "$@" > "$out/gpu-tests-more.log" 2>&1
  echo "gpu tests: $(tail -1 "$out/gpu-tests-more.log")"; grep -E "^FAILED" "$out/gpu-tests-more.log" | head -20
  ;;
probe-gemv)
  . /tmp/onnxopt-env.sh; shift
  for round in 1 2; do
    for setting in "$@"; do
      name=$(echo "${setting:-defaults}" | tr ' =' '_-')
      env $setting taskset -c 0-1 timeout 120 python3 scripts/gpu_linear_probe.py --hidden 4096 --intermediate 14336 \
        --layers 8 --replays 20 --bits 4 > "$out/probe-$name-$round.txt" 2>&1
      echo "${setting:-defaults}: rc $? $(grep -E 'projections_us' "$out/probe-$name-$round.txt" | tail -1 | cut -c1-120)"
    done
  done
  ;;
bench-gemv)
  . /tmp/onnxopt-env.sh; shift
  for round in 1 2; do
    for setting in "$@"; do
      env $setting python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 128 --new-tokens 128 \
        --repeats 3 --engines onnxopt-cuda-int4wo-half2 --out "$out" > "$out/gemv.txt" 2>> "$out/bench-gemv.log"
      echo "${setting:-defaults}: rc $? $(tail -1 "$out/gemv.txt" | cut -c1-130)"
    done
  done
  ;;
bench-decode)  # issue 5's ratio: fp16 and int4-wo decode in one process
  . /tmp/onnxopt-env.sh
  python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 128 --new-tokens 128 --repeats 3 \
    --engines onnxopt-cuda,onnxopt-cuda-int4wo-half2 --out "$out" > "$out/bench-decode.txt" 2> "$out/bench-decode.log"
  echo "bench 128 -> 128: rc $?"; tail -4 "$out/bench-decode.txt"
  ;;
probe-sums)  # as probe-gemv
  exec bash "$0" probe-gemv ONNXOPT_GEMV_SUMS=word ONNXOPT_GEMV_SUMS=chunk
  ;;
bench-sums)  # as bench-gemv
  exec bash "$0" bench-gemv ONNXOPT_GEMV_SUMS=word ONNXOPT_GEMV_SUMS=chunk
  ;;
bench-prefill-form)
  . /tmp/onnxopt-env.sh
  python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 2048 \
    --new-tokens 16 --repeats 2 --engines onnxopt-cuda,onnxopt-cuda-fp8,onnxopt-cuda-fp8-swiglu-off,onnxopt-cuda-fp8-swiglu-in \
    --out "$out" > "$out/bench-prefill-form.txt" 2> "$out/bench-prefill-form.log"
  echo "bench 2048 -> 16, fast accumulation, prefill form: rc $?"; tail -5 "$out/bench-prefill-form.txt" | cut -c1-150
  grep -h "first token" "$out/bench-prefill-form.log" | sed 's/^.*: run/  run/' | tail -8
  ;;
bench-plans)
  . /tmp/onnxopt-env.sh
  # the half2 GEMV plans of q/k/v [6144 x 4096] and o [4096 x 4096] inside the captured int4 step
  # (custom_ops/linear_half2.py plan(): one-projection probes misjudge them), 128 -> 128, int4 alone
  for plans in "" "6144x4096=1,4" "6144x4096=4,1;4096x4096=4,1" "6144x4096=4,2" "4096x14336=4,4" "4096x14336=8,4"; do
    ONNXOPT_GEMV_PLANS="$plans" python3 scripts/bench_decode.py --device cuda --model llama-8b --prompt-tokens 128 \
      --new-tokens 128 --repeats 3 --engines onnxopt-cuda-int4wo-half2 --out "$out" > "$out/plans.txt" \
      2>> "$out/bench-plans.log"
    echo "plans '${plans:-default}': rc $? $(tail -1 "$out/plans.txt" | cut -c1-130)"
  done
  ;;
prefill-profile)
  . /tmp/onnxopt-env.sh
  python3 scripts/gpu_profile.py llama-8b --package "$cache/onnxopt-fp16-fp8-cuda" --prefill --prompt-tokens 2048 \
    --fp8-swiglu-input --out "$out/fp8" 2> "$out/profile-fp8.log" | head -34
  python3 scripts/gpu_profile.py llama-8b --package "$cache/onnxopt-fp16-last-cuda" --prefill --prompt-tokens 2048 \
    --out "$out/fp16" 2> "$out/profile-fp16.log" | head -34
  ;;
bench-parts)  # as bench-gemv
  exec bash "$0" bench-gemv ONNXOPT_GEMV_PART_BUFFERS=1 ONNXOPT_GEMV_PART_BUFFERS=2
  ;;
pack-eval)  # HERE, not on the GPU machine: PKG and TEXT as tar parts of at most 60 MB, one .gpu/faN folder each
  pkg=${2:?pack-eval PKG TEXT}; text=${3:?pack-eval PKG TEXT}
  rm -rf .gpu/fa[0-9]*; tmp=$(mktemp -d)
  mkdir -p "$tmp/eval" && cp -r "$pkg" "$tmp/eval/package" && cp "$text" "$tmp/eval/text.txt"
  tar cf - -C "$tmp" eval | split -b 60000000 -d - "$tmp/part."
  i=0; for part in "$tmp"/part.*; do i=$((i + 1)); mkdir -p ".gpu/fa$i"; mv "$part" ".gpu/fa$i/"; done
  rm -rf "$tmp"; echo "carry .gpu/fa1 .. .gpu/fa$i, one a call, each with: bash scripts/gpu_quant_session.sh stash"
  ;;
stash)
  mkdir -p /tmp/fa-parts
  for d in .gpu/fa[0-9]*; do [ -d "$d" ] && cp -n "$d"/part.* /tmp/fa-parts/ 2>/dev/null; done
  echo "$(ls /tmp/fa-parts | wc -l) eval parts kept"
  ;;
eval-fastaccum)
  . /tmp/onnxopt-env.sh
  [ -d /tmp/fa/eval ] || { mkdir -p /tmp/fa && cat /tmp/fa-parts/part.* | tar xf - -C /tmp/fa; } || exit 1
  for fa in 0 1; do
    ONNXOPT_FP8_FAST_ACCUM=$fa timeout 280 onnxopt eval /tmp/fa/eval/package --data /tmp/fa/eval/text.txt \
      --max-tokens 16384 --device cuda --json > "$out/eval-fa$fa.json" 2> "$out/eval-fa$fa.log"
    echo "fast accumulation $fa: rc $? $(cat "$out/eval-fa$fa.json")"
  done
  ;;
eval-defaults)  # the fp8 package's perplexity through the CUDA runtime: the defaults, then each setting off
  . /tmp/onnxopt-env.sh
  [ -d /tmp/fa/eval ] || { mkdir -p /tmp/fa && cat /tmp/fa-parts/part.* | tar xf - -C /tmp/fa; } || exit 1
  for setting in "" ONNXOPT_FP8_SWIGLU_INPUT=0 ONNXOPT_FP8_FAST_ACCUM=0 "ONNXOPT_FP8_SWIGLU_INPUT=0 ONNXOPT_FP8_FAST_ACCUM=0"; do
    name=$(echo "${setting:-defaults}" | tr ' =' '_-')
    env $setting timeout 280 onnxopt eval /tmp/fa/eval/package --data /tmp/fa/eval/text.txt \
      --max-tokens 16384 --device cuda --json > "$out/eval-$name.json" 2> "$out/eval-$name.log"
    echo "${setting:-defaults}: rc $? $(cat "$out/eval-$name.json")"
  done
  ;;
decode-accuracy)  # as eval-fastaccum, PKG an int4-wo package of full logits: decode against prefill logits per ONNXOPT_GEMV_SUMS
  . /tmp/onnxopt-env.sh
  [ -d /tmp/fa/eval ] || { mkdir -p /tmp/fa && cat /tmp/fa-parts/part.* | tar xf - -C /tmp/fa; } || exit 1
  for sums in word chunk; do
    ONNXOPT_GEMV_SUMS=$sums timeout 240 python3 scripts/gpu_decode_accuracy.py /tmp/fa/eval/package \
      --data /tmp/fa/eval/text.txt --prompts 8 --new-tokens 64 --json > "$out/decode-accuracy-$sums.json" 2> "$out/decode-accuracy-$sums.log"
    echo "sums $sums: rc $? $(cat "$out/decode-accuracy-$sums.json")"
  done
  ;;
*) echo "unknown step $1 (build|start|probe|probe-decode|wait|bench|bench-prefetch|bench-autotune|bench-fastaccum|bench-plans|bench-residency|bench-sums|bench-parts|probe-sums|probe-gemv|bench-gemv|bench-decode|tests|bench-prefill-form|prefill-profile|pack-eval|stash|eval-fastaccum|eval-defaults|decode-accuracy|quick)" >&2; exit 2 ;;
esac
