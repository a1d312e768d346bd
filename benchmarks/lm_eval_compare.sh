#!/usr/bin/env bash
# lm-eval-harness against a running pdserve endpoint, side by side with lm-eval's own transformers
# backend on the same checkpoint, through local-completions with the endpoint's remote tokenizer
# (/tokenize, /tokenizer_info): a multiple-choice task (loglikelihood: token-id prompts, echo,
# logprobs 1, max_tokens 1) and the same questions generated (generate_until: greedy, six stop
# strings). Prints one JSON line: both backends' scores, the largest difference between their
# loglikelihoods, and how many generations are equal.
#   usage: LM_EVAL=/path/to/lm_eval benchmarks/lm_eval_compare.sh URL MODEL_NAME CHECKPOINT_DIR [TASK_DIR]
#   needs: pip install "lm_eval[api]" torch transformers (any virtualenv; LM_EVAL names its lm_eval)
set -euo pipefail
url=${1:?endpoint URL, e.g. http://127.0.0.1:8000}; name=${2:?served model name}; ckpt=${3:?checkpoint dir}
tasks=${4:-benchmarks/lm_eval}; lm_eval=${LM_EVAL:-lm_eval}; out=$(mktemp -d)
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
common=(--tasks pdserve_capitals,pdserve_capitals_gen --include_path "$tasks" --batch_size 8 --log_samples)
curl -sf "$url/tokenizer_info" > /dev/null  # the endpoint answers (its remote tokenizer, which lm-eval uses)
"$lm_eval" --model local-completions --output_path "$out/pdserve" "${common[@]}" \
  --model_args "model=$name,base_url=$url/v1/completions,tokenizer_backend=remote,num_concurrent=4,max_retries=1" > "$out/pdserve.log" 2>&1
"$lm_eval" --model hf --device cpu --output_path "$out/hf" "${common[@]}" \
  --model_args "pretrained=$ckpt,dtype=float32" > "$out/hf.log" 2>&1
python3 - "$out" <<'PY'
import glob, json, sys
def load(kind, task):
    rows = [json.loads(l) for l in open(glob.glob(f"{sys.argv[1]}/{kind}/*/samples_{task}_2*.jsonl")[0])]
    res = json.load(open(glob.glob(f"{sys.argv[1]}/{kind}/*/results_*.json")[0]))["results"][task]
    return {r["doc_id"]: r["filtered_resps"] for r in rows}, res
(a, ra), (b, rb) = load("pdserve", "pdserve_capitals"), load("hf", "pdserve_capitals")
diffs = [abs(float(x[0]) - float(y[0])) for k in a for x, y in zip(a[k], b[k])]
(ga, gra), (gb, grb) = load("pdserve", "pdserve_capitals_gen"), load("hf", "pdserve_capitals_gen")
print(json.dumps({"loglikelihoods": len(diffs), "acc_pdserve": ra["acc,none"], "acc_hf": rb["acc,none"],
                  "max_abs_diff": max(diffs), "is_greedy_equal": all([x[1] for x in a[k]] == [y[1] for y in b[k]] for k in a),
                  "generations": len(ga), "generations_equal": sum(ga[k] == gb[k] for k in ga),
                  "exact_match_pdserve": gra["exact_match,none"], "exact_match_hf": grb["exact_match,none"]}))
PY
