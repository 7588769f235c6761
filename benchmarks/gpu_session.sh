#!/usr/bin/env bash
# One device call: baseline bench against the anchors, then a kernel profile of hybridlm and mamba_ssm.
#   source .gpu/setup.sh && HYBRIDLM_GIT_COMMIT=<sha> bash benchmarks/gpu_session.sh PHASE...
# <sha>: `git rev-parse HEAD` of the tree you send, typed in (the device's copy of .git may be stale)
# Logs go to $OUT (the device tool brings them back). Triton's compiled kernels and autotuning results and
# Inductor's cache go to one archive, $OUT/kernel-cache.tgz: copied to .kernel-cache.tgz (git-ignored) and
# carried to the next call, it saves the ~100 s of mamba_ssm autotuning and the torch.compile time.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export TRITON_CACHE_AUTOTUNING=1
CACHE=/tmp/kernel-cache
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
mkdir -p "$CACHE"
if [ -f .kernel-cache.tgz ]; then tar xzf .kernel-cache.tgz -C "$CACHE"; fi
CFG=configs/hybrid-500m.yaml
run() {  # run NAME SECONDS CMD...: bounded, logged, never aborts the session
  local name=$1 secs=$2; shift 2
  echo "== $name"
  timeout -k 10 "$secs" "$@" >"$OUT/$name.log" 2>&1; echo "   rc=$? $(date +%T)"
  tail -n 40 "$OUT/$name.log" | grep -v "^INFO" | tail -n 25
}
track200() {  # track200 SECONDS: the first 200 steps of the 500M config, fused vs reference ops, both at once
  run track "$1" python3 benchmarks/track_reference.py $CFG train.micro_batch_size=1 train.seq_len=2048 \
    train.grad_accum=1 train.warmup_steps=20 train.zero_stage=0 --steps 200 --out-dir /tmp/track \
    --results "$OUT/track_reference.jsonl" --parallel
  cp /tmp/track/*.log "$OUT/" 2>/dev/null
}
statetests() {  # the mixer against mamba_ssm's kernels for ops/ssd_states.py's (bf16, with and without documents), a
  # Mamba-2 model, the captured steps
  run states-check 320 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
    tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
    -k "conv_ssd_scan and upstream and state and not passing or model_fused_matches_reference and 2-bf16 or captured_step and 2"
}
graphtables() {  # graphtables SECONDS TOP SHAPE...: the graphed step's kernel table (the .tsv) at each shape
  local secs=$1 top=$2; shift 2
  for shape in "$@"; do
    run prof-graph-$shape "$secs" python3 benchmarks/profile_step.py $CFG --graph --shape $shape --top "$top" --out "$OUT/prof"
  done
  rm -f "$OUT"/prof*/*.json
}
phases=()
for phase in "$@"; do  # train2: training against the mamba_ssm hybrid, then HF's models (anchors, then hf)
  if [ "$phase" = train2 ]; then phases+=(anchors hf); else phases+=("$phase"); fi
done
for phase in "${phases[@]}"; do
  case $phase in
    baseline)
      run bench-8x4096 300 python3 -m hybridlm bench $CFG --shapes 8x4096 --systems hybridlm,mamba_ssm,hybridlm-transformer \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run bench-bamba 150 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba \
        --warmup 2 --steps 6 --out "$OUT/bench.jsonl" ;;
    gputests)  # the fused-vs-reference cases of the ops the levers added, whole models, cached decoding
      run gpu-tests 150 python3 -m pytest -q -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "add_rms_norm or conv_ssd_scan or swiglu or cross_entropy or model_fused_matches or cached_decoding or dispatch" ;;
    ablate)
      run bench-ablate 220 python3 -m hybridlm bench $CFG --shapes 8x4096 --systems hybridlm,mamba_ssm --ablate \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    decode)
      run bench-decode 120 python3 -m hybridlm bench $CFG --shapes none --systems hybridlm,hybridlm-transformer,mamba_ssm \
        --decode --out "$OUT/bench.jsonl" ;;
    final)  # the README table: training at the shapes, HF anchors, longest sequence, decode
      run final-train 250 python3 -m hybridlm bench $CFG --systems hybridlm,mamba_ssm,hybridlm-transformer \
        --warmup 2 --steps 6 --out "$OUT/bench.jsonl"
      run final-hf 70 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 2 --steps 5 --out "$OUT/bench.jsonl"
      run final-longest 120 python3 -m hybridlm bench $CFG --shapes 1x32768 --systems hybridlm,mamba_ssm --longest \
        --warmup 1 --steps 2 --out "$OUT/bench.jsonl"
      run final-decode 120 python3 -m hybridlm bench $CFG --shapes none --systems hybridlm,hybridlm-transformer,mamba_ssm \
        --decode --out "$OUT/bench.jsonl" ;;
    table)  # the README table without the longest-sequence search (a call with ~500 s of device time left)
      run final-train 250 python3 -m hybridlm bench $CFG --systems hybridlm,mamba_ssm,hybridlm-transformer \
        --warmup 2 --steps 6 --out "$OUT/bench.jsonl"
      run final-hf 70 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 2 --steps 5 --out "$OUT/bench.jsonl"
      run final-decode 120 python3 -m hybridlm bench $CFG --shapes none --systems hybridlm,hybridlm-transformer,mamba_ssm \
        --decode --out "$OUT/bench.jsonl" ;;
    long)  # the 1x32768 shape, decode at 32k, the longest sequence (after a first call spent its time elsewhere)
      run long-train 160 python3 -m hybridlm bench $CFG --shapes 1x32768 --systems hybridlm,mamba_ssm \
        --warmup 2 --steps 4 --out "$OUT/bench.jsonl"
      run long-decode 110 python3 -m hybridlm bench $CFG --shapes none --systems hybridlm,hybridlm-transformer,mamba_ssm \
        --decode --out "$OUT/bench.jsonl"
      run long-longest 110 python3 -m hybridlm bench $CFG --shapes 1x65536 --systems hybridlm --longest \
        --warmup 1 --steps 1 --out "$OUT/bench.jsonl" ;;
    train32k)
      run train-32k 150 python3 -m hybridlm bench $CFG --shapes 1x32768 --systems hybridlm,mamba_ssm \
        --warmup 2 --steps 4 --out "$OUT/bench.jsonl" ;;
    optests)  # op-level fused-vs-reference cases of the levers not reached by an earlier call
      run op-tests 150 python3 -m pytest -q -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "swiglu or cross_entropy or (conv_ssd_scan and bf16)" ;;
    track)  # the first 200 steps of the 500M config, fused vs reference ops (both at once: one GPU holds both)
      track200 450 ;;
    track+tests)  # tracking and the GPU tests share the GPU: neither is timed
      track200 450 &
      run gpu-tests 420 python3 -m pytest -q -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "graphed or cached_decoding or model_fused_matches or swiglu or cross_entropy or conv_ssd_scan or dispatch"
      wait ;;
    levers+longest)  # every lever's ablation at 8x4096 (fused AdamW included), the anchor's longest sequence
      run bench-ablate 300 python3 -m hybridlm bench $CFG --shapes 8x4096 --systems hybridlm,mamba_ssm --ablate \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run longest-mamba_ssm 200 python3 -m hybridlm bench $CFG --shapes 1x32768 --systems mamba_ssm --longest \
        --warmup 1 --steps 2 --out "$OUT/bench.jsonl" ;;
    decodegraph)  # decode with CUDA graphs against the anchors, and the same without graphs (--ablate)
      run bench-decode 400 python3 -m hybridlm bench $CFG --shapes none --systems hybridlm,hybridlm-transformer,mamba_ssm \
        --decode --ablate --out "$OUT/bench.jsonl" ;;
    decodeprof)  # is a decode step bound by launches? wall vs kernel time per token
      run prof-decode-b1 120 python3 benchmarks/profile_step.py $CFG --decode --shape 1x32768 --out "$OUT/prof"
      run prof-decode-b16 120 python3 benchmarks/profile_step.py $CFG --decode --shape 16x32768 --out "$OUT/prof" ;;
    profile)
      run prof-hybridlm 60 python3 benchmarks/profile_step.py $CFG --system hybridlm --out "$OUT/prof"
      run prof-mamba_ssm 150 python3 benchmarks/profile_step.py $CFG --system mamba_ssm --out "$OUT/prof" ;;
    track+graphtests)  # 200 tracked steps (fast path with CUDA graphs vs eager reference) beside the graph tests
      track200 560 &
      run graph-tests 540 python3 -m pytest -v -s -m gpu tests/train/test_graphed_step.py -p no:cacheprovider --durations=0
      wait ;;
    graphfinal)  # the HF anchors at 2x4096 and the 1x32768 shape, with and without the graphed step
      run graph-hf 170 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run graph-32k 300 python3 -m hybridlm bench $CFG --shapes 1x32768 --systems hybridlm,mamba_ssm \
        --ablate cuda_graph --warmup 2 --steps 4 --out "$OUT/bench.jsonl" ;;
    graphtests)  # the CUDA-graphed training step against the eager model, and in the trainer (cold: minutes)
      run graph-tests 400 python3 -m pytest -q -s -m gpu tests/train/test_graphed_step.py -p no:cacheprovider ;;
    graphtrain)  # what the CUDA-graphed training step gains where the host bound the step, and at 8x4096
      run graph-bench 300 python3 -m hybridlm bench $CFG --shapes 2x4096,8x4096 --systems hybridlm,mamba_ssm \
        --ablate cuda_graph --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run graph-hf 150 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    lastcall)  # a short last call: training vs mamba_ssm, the slow model / decoding cases, HF's models at 2x4096
      run bench-train 220 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 2 --steps 6 --out "$OUT/bench.jsonl"
      run model-tests 150 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "model_fused_matches_reference and 2-bf16 or cached_decoding" --durations=5
      run bench-hf 100 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 2 --steps 6 --out "$OUT/bench.jsonl" ;;
    opvariants)  # each op's implementations, forward + backward at the 500M config's shapes
      run op-variants 150 python3 benchmarks/op_variants.py $CFG --shape 8x4096 ;;
    compiledtests)  # the ops torch.compile fuses, whole models and cached decoding, fused vs reference
      run compiled-tests 240 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "add_rms_norm or rotary or swiglu or model_fused_matches or cached_decoding" --durations=10 ;;
    track+compiledtests)  # 200 tracked steps beside the compiled ops' tests and the graphed-step tests (untimed)
      track200 560 &
      run compiled-tests 240 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "add_rms_norm or rotary or swiglu or model_fused_matches or cached_decoding" --durations=10
      run graph-tests 300 python3 -m pytest -v -s -m gpu tests/train/test_graphed_step.py -p no:cacheprovider
      wait ;;
    profileops)  # the kernel profile of hybridlm's step, then its top torch ops with their input shapes
      run prof-ops 120 python3 benchmarks/profile_step.py $CFG --system hybridlm --top 40 --ops --out "$OUT/prof"
      rm -f "$OUT"/prof/*.json ;;
    ssdvariants)  # Mamba-2's conv + SSD + gated norm (chunk sizes, unfused, matmul SSD, fla if carried), the MLP's gate/up
      run ssd-variants 240 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan,gate_up ;;
    long-variants)  # at 1x32768: attention's SDPA backends, conv + SSD (its variants as in ssdvariants)
      run long-variants 240 python3 benchmarks/op_variants.py $CFG --shape 1x32768 --ops attention,conv_ssd_scan ;;
    ssdmatmul)  # conv + SSD + gated norm: mamba_ssm's kernels against the SSD as cuBLAS products (both shapes)
      run ssd-8x4096 280 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan
      run ssd-1x32768 280 python3 benchmarks/op_variants.py $CFG --shape 1x32768 --ops conv_ssd_scan ;;
    zero3)  # ZeRO-3 on the GPU (compiled ops on gathered parameters) against ZeRO-0, the tiny config, 60 steps
      for stage in 0 3; do
        run zero$stage 240 python3 train.py configs/tiny.yaml train.zero_stage=$stage train.max_steps=60 \
          train.eval_every=1000 train.save_every=1000 out_dir=/tmp/zero$stage
        cp /tmp/zero$stage/metrics.jsonl "$OUT/zero$stage-metrics.jsonl" 2>/dev/null
      done ;;
    hf)  # transformers' Bamba and Llama at 2x4096, where the host bounds them
      run bench-hf 150 python3 -m hybridlm bench $CFG --shapes 2x4096 --systems hybridlm,hf-bamba,hf-llama \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    profile32k)  # where a 1x32768 step's kernel time goes (attention grows with the square of the length)
      run prof-32k 150 python3 benchmarks/profile_step.py $CFG --system hybridlm --shape 1x32768 --top 25 --out "$OUT/prof"
      rm -f "$OUT"/prof/*.json ;;
    anchors)  # training at 8x4096 and 1x32768 against the mamba_ssm hybrid
      run bench-train 260 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    kepttests)  # conv + SSD + gated norm keeping its intermediates: against the reference ops and mamba_ssm's combined op
      run kept-tests 400 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "conv_ssd_scan or model_fused_matches_reference and 2-" --durations=5 ;;
    keptvariants)  # conv + SSD + gated norm: the op keeping its intermediates against mamba_ssm's combined op
      for shape in 8x4096 1x32768; do
        run kept-variants-$shape 200 python3 benchmarks/op_variants.py $CFG --shape $shape --ops conv_ssd_scan \
          --variants kept,combined --each-error
      done ;;
    chunks)  # training against the mamba_ssm hybrid at the config's SSD chunk (256), then both at chunk 128
      for chunk in 256 128; do
        run bench-chunk$chunk 240 python3 -m hybridlm bench $CFG model.mamba.chunk_size=$chunk --shapes 8x4096,1x32768 \
          --systems hybridlm,mamba_ssm --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      done ;;
    ownbwd)  # hybridlm's Triton gated-norm backward and cross-entropy: op times, GPU tests, then the bench
      run own-variants-8x4096 120 python3 benchmarks/op_variants.py $CFG --shape 8x4096 \
        --ops conv_ssd_scan,cross_entropy --variants "kept chunk 128,kept upstream,triton,compile" --each-error
      run own-tests 200 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        -k "conv_ssd_scan and seq_idx or cross_entropy or model_fused_matches_reference and 2-" \
        --durations=5
      run bench-train 240 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    sweep)  # hybridlm's own Triton kernels against the upstream ones, over their launch shapes
      run sweep-8x4096 400 python3 benchmarks/own_kernels.py $CFG --shape 8x4096 ;;
    track+modeltests)  # 200 tracked steps beside the whole-model and CUDA-graphed-step tests of Mamba-2
      track200 560 &
      run model-tests 540 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "model_fused_matches_reference and 2- or captured_step and 2"
      wait ;;
    ssdconfigs)  # mamba_ssm's SSD kernels over launch configs beyond their autotuners' lists; weight-grad dtypes
      run ssd-configs 420 python3 benchmarks/ssd_configs.py $CFG --shape 8x4096 --jobs 14
      run wgrad-dtype 90 python3 benchmarks/wgrad_dtype.py $CFG --shape 8x4096 ;;
    launchstates)  # the mixer's wider autotuning lists and bf16 chunk states: op times and errors, GPU tests, bench
      run launch-variants-8x4096 170 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept upstream launch,kept fp32 states,combined chunk 128" --each-error
      run launch-tests 200 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --durations=5 -k "conv_ssd_scan or model_fused_matches_reference and 2-"
      run bench-train 200 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    track+launchtests)  # 200 tracked steps beside the mixer's GPU cases, whole Mamba-2 models and graphed steps
      track200 560 &
      run launch-tests 550 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan or model_fused_matches_reference and 2- or captured_step and 2"
      wait ;;
    castonce)  # the graphed step casting the linear weights once: bench with it off, graphed-step profiles, GPU tests
      run bench-cast 260 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate cast_once --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run prof-graph 80 python3 benchmarks/profile_step.py $CFG --graph --top 30 --out "$OUT/prof"
      run prof-graph-nocast 80 python3 benchmarks/profile_step.py $CFG --graph --no-cast-once --top 30 \
        --out "$OUT/prof-nocast"
      rm -f "$OUT"/prof*/*.json
      run graph-tests 240 python3 -m pytest -v -s -m gpu tests/train/test_graphed_step.py -p no:cacheprovider \
        --durations=5 ;;
    handoff)  # the mixer's decay gradient compiled, the graphed step's gradient handoff: op times, bench, profile
      run decay-variants-8x4096 150 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept eager decay grad" --each-error
      run bench-handoff 200 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run prof-graph 80 python3 benchmarks/profile_step.py $CFG --graph --top 30 --out "$OUT/prof"
      rm -f "$OUT"/prof*/*.json ;;
    track+handofftests)  # 200 tracked steps beside their GPU tests: the mixer's cases, whole Mamba-2 models, graphed steps
      track200 560 &
      run handoff-tests 550 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=8 \
        -k "conv_ssd_scan or model_fused_matches_reference and 2- or graph or captured"
      wait ;;
    graphtests+anchors)  # the graphed step's GPU tests (cold: minutes), then training against the mamba_ssm hybrid
      run graph-tests 330 python3 -m pytest -v -s -m gpu tests/train/test_graphed_step.py -p no:cacheprovider \
        --durations=8
      run bench-train 230 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    statepassing)  # hybridlm's tiled state passing: kernel sweep at both shapes, its GPU tests, the mixer's op times
      for shape in 8x4096 1x32768; do
        run sweep-state-$shape 150 python3 benchmarks/own_kernels.py $CFG --shape $shape --kernels state
      done
      run state-tests 400 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --durations=5 -k "state_passing or conv_ssd_scan and seq_idx"
      run state-variants-1x32768 120 python3 benchmarks/op_variants.py $CFG --shape 1x32768 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept upstream state passing" --each-error ;;
    statebench)  # the same, then training against the mamba_ssm hybrid at both shapes
      run state-variants-8x4096 120 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept upstream state passing" --each-error
      run bench-train 260 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    linears)  # layers sharing an input summing their input gradient in the GEMMs: GPU tests, then the lever's ablation
      run linears-tests 300 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "linears or model_fused_matches_reference or captured_step and 2"
      run bench-linears 270 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate linears --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    rotarytable)  # rotary from a per-token cos / sin table: GPU tests (the op, cached and graphed decoding), the lever
      run rotary-tests 240 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --durations=5 -k "rotary or cached_decoding or graphed_decoding"
      run bench-rotary 270 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate rotary --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    graphprof)  # the graphed step's kernel profile at 8x4096 (after a phase that leaves time)
      run prof-graph 100 python3 benchmarks/profile_step.py $CFG --graph --top 60 --out "$OUT/prof"
      rm -f "$OUT"/prof*/*.json ;;
    attnlayouts)  # causal attention's cost by the layout of q, k, v (views, packed, contiguous), both shapes
      run attn-layouts 150 python3 benchmarks/attention_layouts.py $CFG --shapes 1x32768,8x4096 ;;
    clocks)  # SM clock and board power while each system trains at each shape: is a step held at the power limit?
      for sys in hybridlm mamba_ssm; do
        for shape in 8x4096 1x32768; do
          run clocks-$sys-$shape 200 python3 benchmarks/power_sample.py --csv "$OUT/smi-$sys-$shape.csv" -- \
            python3 -m hybridlm bench $CFG --shapes $shape --systems $sys --warmup 3 --steps 15 --out "$OUT/bench.jsonl"
        done
      done ;;
    bwdlaunch)  # the mixer's own backward wrappers (no size-1 sums): GPU tests, op times and errors, the bench
      run bwdlaunch-tests 170 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --durations=5 -k "conv_ssd_scan and (bwd or split)"
      run bwdlaunch-variants-8x4096 100 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept upstream bwd launch 128" --each-error
      run bench-bwdlaunch 250 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    bwdtests)  # the same launches' GPU tests given the time they need cold (mixer cases, Mamba-2 models, captured
      # steps), then the bench again
      run bwdlaunch-tests 320 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and (bwd or split) or model_fused_matches_reference and 2- or captured_step and 2"
      run bench-bwdlaunch 230 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    knownfail)  # the known failures' error rows (KNOWN_FAILURES in the GPU tests), reported as plain failures
      run known-failures 200 python3 -m pytest -v -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --runxfail --tb=short -k "one and split and fp32" ;;
    profboth)  # the graphed step's kernel profile at both shapes: every kernel's count and time (the .tsv tables)
      graphtables 150 80 1x32768 8x4096 ;;
    launches)  # which op, called from where, launches the eager step's kernels (memsets and fills included)
      run launches-1x32768 200 python3 benchmarks/profile_step.py $CFG --shape 1x32768 --launches --top 70 \
        --warmup 2 --steps 1 --out "$OUT/prof"
      rm -f "$OUT"/prof*/*.json ;;
    zeroonce)  # the backward's accumulators zeroed once: the mixer's GPU tests (with the known failure's rows and
      # mamba_ssm's combined op at the same length), then training against the mamba_ssm hybrid at both shapes
      run zeroonce-tests 270 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --runxfail --durations=5 -k "conv_ssd_scan and (bwd or split or zeroing)"
      run bench-zeroonce 250 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    zeroonceops)  # the same lever at op level, the graphed step's kernel table, the Mamba-2 models and captured steps
      # (session 16's call gave op_variants 110 s, too few cold: it printed nothing)
      run zeroonce-variants-8x4096 200 python3 benchmarks/op_variants.py $CFG --shape 8x4096 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept zeroing pre-hooks 128" --each-error
      run prof-graph-1x32768 130 python3 benchmarks/profile_step.py $CFG --graph --shape 1x32768 --top 40 --out "$OUT/prof"
      rm -f "$OUT"/prof*/*.json
      run zeroonce-models 250 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "model_fused_matches_reference and 2- or captured_step and 2" ;;
    convbwd)  # hybridlm's conv backward: its launch sweep against causal_conv1d's at 1x32768, then the mixer's
      # GPU tests (against the reference and against causal_conv1d's backward), the Mamba-2 models, captured steps
      run conv-sweep 150 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels conv
      run convbwd-tests 330 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and (causal_conv1d or seq_idx] or scan-) or model_fused_matches_reference and 2- or captured_step and 2" ;;
    convbench)  # the same lever: shorter spans, then training against the mamba_ssm hybrid at both shapes (at
      # aeecd50 it also ran op_variants' "kept causal_conv1d bwd 128", dropped with the lever's use without documents)
      run conv-sweep 90 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels conv
      run bench-convbwd 250 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    convtrack)  # the conv backward with and without documents (timed alone), then the 200-step tracking and the
      # mixer's GPU tests with documents and the captured steps, sharing the GPU (neither timed)
      run conv-sweep 100 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels conv
      track200 420 &
      run convbwd-tests 410 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and (causal_conv1d or seq_idx]) or captured_step and 2"
      wait ;;
    mixertests)  # the mixer's GPU cases against the reference and mamba_ssm's combined op, the Mamba-2 models, the
      # captured steps
      run mixer-tests 400 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan[seq_idx] or conv_ssd_scan- or combined or model_fused_matches_reference and 2- or captured_step and 2" ;;
    dx)  # hybridlm's x-gradient kernel: its launch sweep against mamba_ssm's at 1x32768, then training against the
      # mamba_ssm hybrid at both shapes with it off and an A/A control (own_conv_bwd: nothing without documents)
      run dx-sweep 150 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels dx
      run bench-dx 400 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate own_dx,own_conv_bwd --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    dxprof)  # the x-gradient kernel's sweep with dy loaded once, then the graphed step's kernel table at 1x32768
      run dx-sweep 150 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels dx
      run prof-graph-1x32768 200 python3 benchmarks/profile_step.py $CFG --graph --shape 1x32768 --top 90 --out "$OUT/prof"
      rm -f "$OUT"/prof*/*.json ;;
    group)  # ops/ssd_group.py's two kernels: their launch sweeps against mamba_ssm's at 1x32768, then training
      # against the mamba_ssm hybrid at both shapes with each off and an A/A control (own_conv_bwd: no documents)
      run group-sweep 170 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels scan,dx
      run bench-group 380 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate own_scan_fwd,own_dx,own_conv_bwd --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    grouptrack)  # ops/ssd_group.py's kernels: the 200-step tracking beside the mixer's GPU cases (against the
      # reference, against mamba_ssm's kernels, one split), the Mamba-2 models and the captured steps (neither timed)
      track200 430 &
      run group-tests 430 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan or model_fused_matches_reference and 2- or captured_step and 2"
      wait ;;
    groupcheck)  # ssd_group's kernels after a change that should not move them: their default launches timed against
      # mamba_ssm's, the mixer against mamba_ssm's kernels (bf16), the Mamba-2 models, the captured steps
      # (-k: "dx" alone also matches every "seq_idx" case, "vs" every test of test_fused_vs_reference.py)
      run group-quick 120 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels scan,dx --quick
      run group-check 400 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and upstream and (dx or fwd) and not norm and not launch and not passing and not grads or model_fused_matches_reference and 2- or captured_step and 2" ;;
    groupall)  # all three of ssd_group's kernels after a change that should not move them: default launches timed
      # against mamba_ssm's, the mixer against mamba_ssm's kernels (bf16), a Mamba-2 model, the captured steps
      run group-quick 120 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels scan,dx,cb --quick
      run group-check 400 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and upstream and (dx or fwd or grads) and not norm and not launch and not passing or model_fused_matches_reference and 2-bf16 or captured_step and 2" ;;
    cbcheck)  # ssd_group's C·Bᵀ-gradient kernel: its launch sweep against mamba_ssm's two kernels at 1x32768, the
      # mixer against mamba_ssm's kernels (bf16), the Mamba-2 models, the captured steps
      run cb-sweep 200 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels cb
      run cb-check 420 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and upstream and cb or model_fused_matches_reference and 2-bf16 or captured_step and 2" ;;
    cbbench)  # ssd_group's C·Bᵀ-gradient kernel at its default launch (with documents too), then training against
      # the mamba_ssm hybrid at both shapes with it off and an A/A control (own_conv_bwd: no documents)
      run cb-quick 100 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels cb --quick
      run bench-cb 420 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate own_cb_grads,own_conv_bwd --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    states)  # ops/ssd_states.py's kernels: their launch sweeps against mamba_ssm's at 1x32768, then statetests
      run states-sweep 250 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels states,stategrads
      statetests ;;
    statecheck)  # ops/ssd_states.py's kernels at their default launches (with documents too), statetests, then the
      # graphed step's kernel table at 2x4096 (HF Bamba's shape: what is left once the host no longer bounds it)
      run states-quick 120 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels states,stategrads --quick
      statetests
      run prof-graph-2x4096 150 python3 benchmarks/profile_step.py $CFG --graph --shape 2x4096 --top 60 --out "$OUT/prof" ;;
    ssdstatesbench)  # ops/ssd_states.py's kernels: training against the mamba_ssm hybrid at both shapes with each lever
      # off and an A/A control (own_conv_bwd: no documents)
      run bench-states 560 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate own_chunk_states,own_state_grads,own_conv_bwd --warmup 3 --steps 8 --out "$OUT/bench.jsonl" ;;
    fillheads)  # the heads a program that ssd_group.launch_heads picks where the chunks are fewer than the SMs (2x4096):
      # launch sweeps there, the defaults at 1x32768 (where it keeps every run), every own-kernel case of the mixer
      # against mamba_ssm's kernels (bf16), the mixer at 72 chunks (runs of 4 heads) against the reference, a model,
      # the captured step
      run fill-2x4096 240 python3 benchmarks/own_kernels.py $CFG --shape 2x4096 --kernels scan,dx,stategrads
      run fill-2x4096-quick 90 python3 benchmarks/own_kernels.py $CFG --shape 2x4096 --kernels cb,states --quick
      run fill-1x32768-quick 90 python3 benchmarks/own_kernels.py $CFG --shape 1x32768 --kernels scan,dx,cb,states,stategrads --quick
      run fill-check 300 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan and upstream and not norm and not launch and not passing or split and bf16 and not combined or model_fused_matches_reference and 2-bf16 or captured_step and 2 and bf16" ;;
    profhf)  # the graphed step's kernel table at 2x4096 (HF Bamba's shape) and at 1x32768
      graphtables 200 90 2x4096 1x32768 ;;
    cbtests)  # after a change to how the mixer picks ssd_group's C·Bᵀ-gradient kernel: its cases against mamba_ssm's
      # two kernels (with documents and without), the mixer against the reference, a model, the captured step (bf16)
      run cb-tests 280 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "cb and grads and bf16 or ssd_scan-bf16 or model_fused_matches_reference and 2-bf16 or captured_step and 2 and bf16" ;;
    prof32k)  # the graphed step's kernel table at 1x32768
      graphtables 200 90 1x32768 ;;
    chunkstates)  # each chunk's own state in bf16: the mixer op's time and errors with it and without at 1x32768,
      # training with it off (A/A control own_conv_bwd), then the mixer's GPU cases against the reference and fp32
      # chunk states, the Mamba-2 models
      run cs-op 120 python3 benchmarks/op_variants.py $CFG --shape 1x32768 --ops conv_ssd_scan \
        --variants "kept chunk 128,kept fp32 chunk states" --each-error
      run bench-cs 260 python3 -m hybridlm bench $CFG --shapes 8x4096,1x32768 --systems hybridlm,mamba_ssm \
        --ablate lowp_chunk_states,own_conv_bwd --warmup 3 --steps 8 --out "$OUT/bench.jsonl"
      run cs-tests 190 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py -p no:cacheprovider \
        --durations=5 -k "conv_ssd_scan and (chunk or bf16 and not upstream and not combined and not split and not states and not decay and not zeroing and not causal) or model_fused_matches_reference and 2-bf16" ;;
    dxtests)  # the mixer's GPU cases with hybridlm's x-gradient kernel (against the reference, against mamba_ssm's
      # kernel, one split), the Mamba-2 models, the captured steps
      run dx-tests 560 python3 -m pytest -v -s -m gpu tests/ops/test_fused_vs_reference.py \
        tests/train/test_graphed_step.py -p no:cacheprovider --durations=5 \
        -k "conv_ssd_scan or model_fused_matches_reference and 2- or captured_step and 2" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
# (the archive is ~20 MB, over what a call brings back; kept for machines where it is not)
[ -n "${KEEP_KERNEL_CACHE:-}" ] && tar czf "$OUT/kernel-cache.tgz" -C "$CACHE" .
