#!/usr/bin/env bash
# One device call's worth of GPU work, by stage: bash benchmarks/run_gpu_suite.sh STAGE...
#   setup        install pagedllm (editable, no deps) and record versions
#   tests        tests/gpu but the two-GPU tests (kernels in fp32/fp16/bf16, greedy parity with the cpu backend;
#                ~250-300 s on an H200): together with tp-tests (~270 s) they do not fit one 600 s call
#   conformance  the conformance kit on --device $DEVICE (default cuda; DEVICE=rocm on an AMD GPU, where the
#                benchmark stages run --device rocm too and the tests/gpu stages, written for cuda, do not apply)
#   profile      benchmarks/cuda_step_profile.py on the Llama-3-8B-shaped config (PROFILE_EXTRA: more options,
#                e.g. --num-requests 1 --skip-ceilings for the kernels of a batch-1 decode step)
#   moe-tests    tests/gpu/test_cuda_moe.py (the experts' kernels, Mixtral and Qwen3-MoE parity)
#   moe-probe    benchmarks/moe_probe.py on Qwen3-30B-A3B's layer (MOE_TOKENS: the token counts)
#   tprof        benchmarks/tput_step_profile.py: the throughput workload step by step, windows under the profiler
#                (TPROF_WINDOWS: their first steps, default 10,100; TPROF_EXTRA: more options, e.g. --quantization fp8)
#   tput         bench throughput, 1000 x 512/128, pagedllm and hf
#   tput-pg      the same, pagedllm only
#   tests-engine only the engine tests of tests/gpu (greedy parity with the cpu backend, bf16, KV budget)
#   sharegpt     bench throughput --dataset sharegpt (SHAREGPT_PROMPTS prompts, default 1000; SHAREGPT_HF_BS: the
#                transformers batch size, default: the largest power of two that fits; SHAREGPT_HF_PROMPTS: run
#                transformers on a random sample of that many), pagedllm and hf
#   sharegpt-pg  bench throughput --dataset sharegpt, 1000 prompts, pagedllm only
#   (MAX_NUM_SEQS and MNBT set --max-num-seqs and --max-num-batched-tokens of every bench stage, default: the
#   backend's, 1024 and 16384 on an H100/H200; BENCH_EXTRA adds options to each,
#   e.g. --no-async-scheduling: asynchronous scheduling is the default on cuda)
#   latency      bench latency, batch 1, 1024 in, 256 out, pagedllm and hf
#   latency-pg   the same, pagedllm only
#   spec         speculative decoding: tests/gpu's case (cuda, eager and with graphs, equal to cpu), then bench
#                latency batch 1 with prompt lookup (SPEC_CONFIG, default 4 drafts), pagedllm and hf (hf's own
#                prompt lookup), and pagedllm without drafts (synchronous scheduling too) for the ratio
#   lora         bench throughput with a random rank-LORA_RANK (default 16) adapter of every projection on every
#                request, LORA_SLOTS (default 4) adapter ids in turn, pagedllm and hf (through PEFT: carry its wheel
#                and accelerate's), then pagedllm without the adapter for the ratio
#   probe        benchmarks/tp_allreduce_probe.py: NCCL vs symmetric-memory all-reduce on two GPUs
#   tp-tests     tests/gpu/test_tensor_parallel_cuda.py (two GPUs)
#   tp-profile   benchmarks/tp_step_profile.py, batch-1 decode steps timed and profiled, tp=1 then tp=2
#   tp           benchmarks/tp_gpu.sh with stages TP_STAGES (default "latency conformance"), results in $LOGS/tp
# Logs go to $LOGS (default /tmp/gpu_logs) and are packed into $OUT/logs.tgz (default OUT /tmp/gpu_out) at the end
# unless PACK=0 (the device tool returns at most 8 files). A stage past its limit gets SIGABRT, so Python's
# fault handler prints where it was.
set -u
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # an editable install was not importable from benchmarks/
OUT=${OUT:-/tmp/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}
mkdir -p "$LOGS"
MODEL=${MODEL:-benchmarks/llama3_8b_config}  # a config.json directory (dummy weights)
SPEC_CONFIG=${SPEC_CONFIG:-'{"method": "ngram", "num_speculative_tokens": 4}'}
BENCH="python -m pagedllm bench"
DEVICE=${DEVICE:-cuda}
COMMON="--model $MODEL --load-format dummy --device $DEVICE ${MAX_NUM_SEQS:+--max-num-seqs $MAX_NUM_SEQS} ${MNBT:+--max-num-batched-tokens $MNBT} ${BENCH_EXTRA:-}"

stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOGS/commands.txt"
    local start=$SECONDS
    timeout -s ABRT -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$LOGS/commands.txt"
    tail -n "${TAIL:-25}" "$LOGS/$name.log"
}

for s in "$@"; do
    case $s in
        setup)
            pip install --no-deps --no-build-isolation -e . -q > "$LOGS/pip.log" 2>&1 || echo "pip install failed"
            { nvidia-smi; python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())"; } > "$LOGS/env.txt" 2>&1
            tail -n 3 "$LOGS/env.txt" ;;
        tests) stage gpu_tests "${TESTS_LIMIT:-330}" python -m pytest tests/gpu -q -p no:cacheprovider \
            --ignore=tests/gpu/test_tensor_parallel_cuda.py ;;
        tests-engine) stage gpu_tests_engine "${TESTS_LIMIT:-120}" python -m pytest tests/gpu/test_cuda_backend.py -q -p no:cacheprovider \
            -k "greedy or bf16 or budget" ;;
        conformance) stage conformance "${CONF_LIMIT:-150}" python -m pytest -p pagedllm.conformance.plugin --pyargs pagedllm.conformance \
            --device "$DEVICE" -q -p no:cacheprovider ;;
        profile) TAIL=120 stage profile "${PROFILE_LIMIT:-220}" python benchmarks/cuda_step_profile.py --model $MODEL \
            --out "$LOGS/prof" ${PROFILE_EXTRA:-} ;;
        moe-tests) stage moe_tests "${MOE_TESTS_LIMIT:-200}" python -m pytest tests/gpu/test_cuda_moe.py -q \
            -p no:cacheprovider ;;
        moe-probe) TAIL=120 stage moe_probe "${MOE_PROBE_LIMIT:-200}" python benchmarks/moe_probe.py \
            --tokens "${MOE_TOKENS:-1,2,4,8,16,64,2048}" --out "$LOGS/moe_probe" ;;
        tprof) TAIL=60 stage tprof "${TPROF_LIMIT:-200}" python benchmarks/tput_step_profile.py --model $MODEL \
            ${MAX_NUM_SEQS:+--max-num-seqs $MAX_NUM_SEQS} ${MNBT:+--max-num-batched-tokens $MNBT} \
            --window-start "${TPROF_WINDOWS:-10,100}" ${TPROF_EXTRA:-} --out "$LOGS/tprof" ;;
        tput) stage tput "${TPUT_LIMIT:-300}" $BENCH throughput $COMMON \
            --backend pagedllm,hf --output-json "$LOGS/tput.json" ;;
        tput-pg) stage tput_pg "${TPUT_LIMIT:-150}" $BENCH throughput $COMMON \
            --backend pagedllm --output-json "$LOGS/tput_pg.json" ;;
        sharegpt) stage sharegpt "${SHAREGPT_LIMIT:-400}" $BENCH throughput $COMMON \
            --dataset sharegpt --num-prompts "${SHAREGPT_PROMPTS:-1000}" --backend pagedllm,hf \
            ${SHAREGPT_HF_BS:+--hf-batch-size $SHAREGPT_HF_BS} ${SHAREGPT_HF_PROMPTS:+--hf-num-prompts $SHAREGPT_HF_PROMPTS} \
            --output-json "$LOGS/sharegpt.json" ;;
        sharegpt-pg) stage sharegpt_pg "${SHAREGPT_PG_LIMIT:-120}" $BENCH throughput $COMMON \
            --dataset sharegpt --num-prompts 1000 --backend pagedllm \
            --output-json "$LOGS/sharegpt_pg.json" ;;
        latency) stage latency "${LATENCY_LIMIT:-240}" $BENCH latency $COMMON --batch-size 1 --input-len 1024 \
            --output-len 256 --num-iters "${LATENCY_ITERS:-3}" --backend pagedllm,hf \
            --output-json "$LOGS/latency.json" ;;
        latency-pg) stage latency_pg "${LATENCY_LIMIT:-120}" $BENCH latency $COMMON --batch-size 1 --input-len 1024 \
            --output-len 256 --num-iters "${LATENCY_ITERS:-3}" --backend pagedllm \
            --output-json "$LOGS/latency_pg.json" ;;
        spec) stage spec_tests "${TESTS_LIMIT:-120}" python -m pytest tests/gpu/test_cuda_backend.py -q \
            -p no:cacheprovider -k speculative
            stage spec_latency "${LATENCY_LIMIT:-240}" $BENCH latency $COMMON --batch-size 1 --input-len 1024 \
            --output-len 256 --num-iters "${LATENCY_ITERS:-3}" --backend pagedllm,hf --no-async-scheduling \
            --speculative-config "$SPEC_CONFIG" \
            --output-json "$LOGS/spec_latency.json"
            stage spec_latency_off "${LATENCY_LIMIT:-240}" $BENCH latency $COMMON --batch-size 1 --input-len 1024 \
            --output-len 256 --num-iters "${LATENCY_ITERS:-3}" --backend pagedllm --no-async-scheduling \
            --output-json "$LOGS/spec_latency_off.json" ;;
        lora) python -c "from pagedllm.testing.lora_adapters import write_lora_adapter as w
w('$MODEL', '/tmp/pagedllm_lora', r=${LORA_RANK:-16}, magnitude=0.01)"
            stage lora_tput "${LORA_LIMIT:-360}" $BENCH throughput $COMMON --enable-lora --max-loras "${LORA_SLOTS:-4}" \
            --max-lora-rank "${LORA_RANK:-16}" --lora-path /tmp/pagedllm_lora --backend pagedllm,hf \
            --output-json "$LOGS/lora_tput.json"
            stage tput_pg "${TPUT_LIMIT:-150}" $BENCH throughput $COMMON --backend pagedllm \
            --output-json "$LOGS/tput_pg.json" ;;
        probe) stage probe "${PROBE_LIMIT:-180}" python benchmarks/tp_allreduce_probe.py --out "$LOGS/probe.json" ;;
        tp-tests) stage tp_tests "${TP_TESTS_LIMIT:-240}" python -m pytest tests/gpu/test_tensor_parallel_cuda.py -q \
            -p no:cacheprovider ;;
        tp-profile) for tp in 1 2; do TAIL=3 stage "tp_profile_$tp" "${TP_PROFILE_LIMIT:-150}" python \
            benchmarks/tp_step_profile.py --model $MODEL --tp $tp --out "$LOGS/tp_profile"; done ;;
        tp) TAIL=40 stage tp "${TP_LIMIT:-400}" bash benchmarks/tp_gpu.sh "$LOGS/tp" "${TP_STAGES:-latency conformance}" ;;
        *) echo "unknown stage $s" ;;
    esac
done
if [ "${PACK:-1}" = 1 ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
fi
