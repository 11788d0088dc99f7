#!/usr/bin/env bash
# Tensor parallelism on two GPUs (issue 6): the Llama-3-8B-shaped dummy model with tp=1 and tp=2.
#
#   1. conformance: greedy completions of a few token-id prompts must be identical for tp=1 and tp=2
#      (float32: required; bfloat16: reported, with the vLLM top-5 rule at the first divergence);
#   2. throughput (bfloat16): `pagedllm bench throughput`, 256 prompts x 512 in / 256 out;
#   3. latency (bfloat16, batch 1): `pagedllm bench latency`, 128 in / 128 out; target: per-token latency
#      of tp=2 <= 0.65x tp=1.
#
# Usage, from anywhere on a machine with >= 2 GPUs:
#   bash benchmarks/tp_gpu.sh [OUT_DIR] [STAGES]
# STAGES: any of "conformance throughput latency" (default: all three). Results (JSON) and a summary go to
# OUT_DIR (default: a new temp dir), so the stages may run in separate invocations with the same OUT_DIR;
# the summary covers every result present. DEVICE (default cuda) and PYTHON (default python) may be set;
# BENCH_EXTRA adds options to the bench commands (e.g. --no-async-scheduling; asynchronous scheduling is
# the default on cuda).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${1:-$(mktemp -d /tmp/tp_gpu.XXXXXX)}"
STAGES="${2:-conformance throughput latency}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODEL="$OUT/llama3-8b-dummy"
mkdir -p "$MODEL"
echo "results in $OUT"

cat > "$MODEL/config.json" <<'EOF'
{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 4096,
  "intermediate_size": 14336,
  "num_hidden_layers": 32,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "vocab_size": 128256,
  "max_position_embeddings": 8192,
  "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0,
  "hidden_act": "silu",
  "attention_bias": false,
  "mlp_bias": false,
  "tie_word_embeddings": false,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "torch_dtype": "bfloat16"
}
EOF

NUM_DEVICES=$("$PY" -c 'import torch; print(torch.accelerator.device_count())')
if [ "$NUM_DEVICES" -lt 2 ]; then
  echo "need at least 2 devices, found $NUM_DEVICES" >&2
  exit 2
fi

# One engine per process: GPU memory is fully given back between runs, and only one tensor-parallel
# group may live in a process.
cat > "$OUT/generate.py" <<'EOF'
"""Greedy completions (and top-5 logprobs) of fixed token-id prompts -> JSON. argv: model tp dtype device out"""
import json
import sys

from pagedllm.core.sampling_params import SamplingParams
from pagedllm.entrypoints.llm import LLM

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], [128000, *range(1000, 1064)], [128000, 40, 1093, 311, 11, 2019]]

if __name__ == "__main__":
    model, tp, dtype, device, out = sys.argv[1:6]
    llm = LLM(model, device=device, dtype=dtype, load_format="dummy", seed=0, tensor_parallel_size=int(tp),
              max_model_len=1024, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.llm_engine.kv_cache_usage() == 0.0
    result = [{"token_ids": o.outputs[0].token_ids,
               "top": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
              for o in outputs]
    llm.llm_engine.shutdown()
    with open(out, "w") as f:
        json.dump(result, f)
EOF

cat > "$OUT/compare.py" <<'EOF'
"""Compare tp=1 and tp=2 completions. argv: tp1.json tp2.json strict(0|1); exit 1 on a strict mismatch."""
import json
import sys

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        ref = json.load(f)
    with open(sys.argv[2]) as f:
        got = json.load(f)
    strict = sys.argv[3] == "1"
    ok = True
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a["token_ids"] == b["token_ids"]:
            diffs = [abs(top_a[t] - top_b[t]) for top_a, top_b in zip(a["top"], b["top"])
                     for t in top_a if t in top_b]
            print(f"  prompt {i}: identical ({len(a['token_ids'])} tokens), max |dlogprob| "
                  f"{max(diffs, default=0.0):.2e}")
            continue
        ok = False
        step = next(s for s, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y)
        top = a["top"][step]
        in_top = str(b["token_ids"][step]) in top
        print(f"  prompt {i}: first divergence at token {step}: tp=1 {a['token_ids'][step]} tp=2 "
              f"{b['token_ids'][step]} ({'within' if in_top else 'NOT within'} tp=1's top-5 {top})")
    print("  MATCH" if ok else ("  MISMATCH" if strict else "  differs (informative in this dtype)"))
    sys.exit(0 if ok or not strict else 1)
EOF

STATUS=0
for stage in $STAGES; do
  case "$stage" in
    conformance)
      for dtype in float32 bfloat16; do
        for tp in 1 2; do
          echo "== conformance: $dtype tp=$tp =="
          "$PY" "$OUT/generate.py" "$MODEL" "$tp" "$dtype" "$DEVICE" "$OUT/gen_${dtype}_tp${tp}.json"
        done
        echo "== conformance: $dtype tp=2 vs tp=1 =="
        strict=0
        [ "$dtype" = float32 ] && strict=1
        "$PY" "$OUT/compare.py" "$OUT/gen_${dtype}_tp1.json" "$OUT/gen_${dtype}_tp2.json" "$strict" || STATUS=1
      done
      ;;
    throughput)
      for tp in 1 2; do
        echo "== throughput: bfloat16 tp=$tp =="
        "$PY" -m pagedllm bench throughput --model "$MODEL" --load-format dummy --dtype bfloat16 \
          --device "$DEVICE" --backend pagedllm -tp "$tp" --num-prompts 256 --input-len 512 --output-len 256 \
          ${BENCH_EXTRA:-} --output-json "$OUT/throughput_tp${tp}.json"
      done
      ;;
    latency)
      for tp in 1 2; do
        echo "== latency: bfloat16 batch 1, tp=$tp =="
        "$PY" -m pagedllm bench latency --model "$MODEL" --load-format dummy --dtype bfloat16 \
          --device "$DEVICE" --backend pagedllm -tp "$tp" --batch-size 1 --input-len 128 --output-len 128 \
          --num-iters 3 ${BENCH_EXTRA:-} --output-json "$OUT/latency_tp${tp}.json"
      done
      ;;
    *)
      echo "unknown stage $stage (conformance, throughput, latency)" >&2
      exit 2
      ;;
  esac
done

echo "== summary (Llama-3-8B-shaped dummy, bfloat16, $DEVICE) =="
"$PY" - "$OUT" <<'EOF'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])


def pagedllm_result(path):
    if not path.is_file():
        return None
    return next(r for r in json.loads(path.read_text())["results"] if r["engine"] == "pagedllm")


thr = {tp: pagedllm_result(out / f"throughput_tp{tp}.json") for tp in (1, 2)}
lat = {tp: pagedllm_result(out / f"latency_tp{tp}.json") for tp in (1, 2)}
for tp in (1, 2):
    if thr[tp]:
        print(f"  throughput tp={tp}: {thr[tp]['output_tokens_per_s']:.0f} output tok/s, "
              f"{thr[tp]['total_tokens_per_s']:.0f} total tok/s")
    if lat[tp]:
        print(f"  latency    tp={tp}: ttft {lat[tp]['extra']['ttft_ms']} ms, "
              f"{lat[tp]['extra']['per_token_ms']} ms per output token (batch 1)")
if thr[1] and thr[2]:
    print(f"  throughput tp=2 / tp=1: {thr[2]['output_tokens_per_s'] / thr[1]['output_tokens_per_s']:.2f}x")
if lat[1] and lat[2]:
    ratio = float(lat[2]["extra"]["per_token_ms"]) / float(lat[1]["extra"]["per_token_ms"])
    print(f"  batch-1 per-token latency tp=2 / tp=1: {ratio:.2f}x (target <= 0.65x: "
          f"{'met' if ratio <= 0.65 else 'NOT met'})")
EOF
exit "$STATUS"
