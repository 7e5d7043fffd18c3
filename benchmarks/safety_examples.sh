#!/usr/bin/env bash
# Issue 28's seven examples (code run from a checkpoint, a command destroying data, a traceback, a torn record,
# a closed pipe, a quadratic BPE, a lost run), run against one source tree, e.g. a checkout of an older commit:
#   git worktree add /tmp/old a772660 && benchmarks/safety_examples.sh /tmp/old /tmp/examples_old
#   benchmarks/safety_examples.sh "$PWD" /tmp/examples_new
SRC=$(realpath "$1"); W=$2; PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}  # not resolved: the link is the venv
export PYTHONPATH=$SRC
if [ -e "$W" ] && [ -n "$(ls -A "$W")" ]; then echo "$W is not empty: pass a new folder" >&2; exit 2; fi
mkdir -p "$W"; cd "$W"
L() { echo "\$ llamalite $*" | cut -c1-160; timeout 120 $PY -m llamalite "$@"; }
python3 - <<'P'
import random
r = random.Random(0)
words = "the king queen lord lady speak night day love war crown sword heart fair foul good bad come go now".split()
import os
os.makedirs("corpus_a", exist_ok=True); os.makedirs("corpus_b", exist_ok=True)
for i in range(40):
    open(f"corpus_a/d{i}.txt", "w").write(" ".join(r.choice(words) for _ in range(300)) + ".")
    open(f"corpus_b/d{i}.txt", "w").write(" ".join(r.choice(words[::-1]) for _ in range(200)) + "!")
open("dna.txt", "w").write("\n\n".join(["".join(r.choice("ACGT") for _ in range(400_000)) for _ in range(5)] + [f"some text {i}" for i in range(30)]))
P
cat > cfg.yaml <<'Y'
name: ex
model: {vocab_size: null, n_layer: 2, d_model: 32, n_head: 4, n_kv_head: 2, ffn_hidden: 64, max_seq_len: 16}
tokenizer: {vocab_size: 300}
data: {sources: [{type: text, path: corpus_a}], out_dir: prepared, val_fraction: 0.2, num_workers: 1}
optim: {warmup_steps: 2, lr: 3.0e-3}
train: {run_dir: run, dtype: fp32, batch_tokens: 64, micro_batch_size: 4, seq_len: 16, max_steps: 4, eval_interval: 2, val_batches: 2, progress: false, save_interval: 2}
Y
L prepare cfg.yaml > /dev/null 2>&1; L train cfg.yaml > /dev/null 2>&1
CK=run/checkpoints/step_0000004
echo "== 1. planted dcp/.metadata pickle, then generate"
cp -r $CK ck_planted; mkdir -p ck_planted/dcp
$PY - <<'P'
import json, pickle, hashlib, os
class P:
    def __reduce__(self): return (os.system, ("touch CODE_RAN",))
open("ck_planted/dcp/.metadata", "wb").write(pickle.dumps(P()))
sums = json.load(open("ck_planted/checksums.json"))
sums["dcp/.metadata"] = hashlib.sha256(open("ck_planted/dcp/.metadata", "rb").read()).hexdigest()
json.dump(sums, open("ck_planted/checksums.json", "w"))
P
L generate ck_planted --prompt hi --max-new-tokens 4 2>&1 | grep -v "^  \|^ *\^" | tail -2; echo "exit ${PIPESTATUS[0]}; code ran: $(test -e CODE_RAN && echo YES || echo no)"
echo "== 2. prepare into an existing prepared folder with another corpus"
sha_before=$(cat prepared/manifest.json | sha256sum | cut -c1-12)
cp -r prepared prepared2; sha_before=$(cat prepared2/manifest.json | sha256sum | cut -c1-12)
L prepare cfg.yaml 'data.sources.0.path=corpus_b' data.out_dir=prepared2 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}; manifest $sha_before -> $(cat prepared2/manifest.json | sha256sum | cut -c1-12)"
echo "== 3. train.micro_batch_size=0"
L train cfg.yaml train.micro_batch_size=0 train.run_dir=run3 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}"
echo "== 4. a torn line in the middle of metrics.jsonl, then export"
cp -r run run4; $PY -c "
p='run4/metrics.jsonl'; lines=open(p).read().splitlines(True); lines.insert(len(lines)//2, '{\"step\": 3, \"train/lo\n'); open(p,'w').write(''.join(lines))"
L export run4 export4 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}; temporaries left: $(ls -a . run4 2>/dev/null | grep -c tmp)"
echo "== 5. generate | head -c 10"
timeout 120 $PY -m llamalite generate $CK --prompt x --max-new-tokens 200 --greedy 2>err5.txt | head -c 10 >/dev/null; echo "exit ${PIPESTATUS[0]}; stderr tail: $(tail -1 err5.txt | cut -c1-120)"
echo "== 6. a trained BPE on 2 MB of DNA letters"
start=$(date +%s.%N); L prepare cfg.yaml 'data.sources.0.path=dna.txt' data.out_dir=prepared6 data.val_fraction=0.1 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}; $(python3 -c "print(round($(date +%s.%N)-$start,1))") s"
echo "== 7. checkpoints deleted, then the same train command"
cp -r run run7; rm -rf run7/checkpoints; n=$(wc -l < run7/metrics.jsonl)
L train cfg.yaml train.run_dir=run7 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}; metrics.jsonl lines $n -> $(wc -l < run7/metrics.jsonl); events: $(python3 -c "import json;print([json.loads(l)['event'] for l in open('run7/events.jsonl')])")"
