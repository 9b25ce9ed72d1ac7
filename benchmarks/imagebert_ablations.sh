#!/bin/bash
# ImageBERT ablations (paper Table 5 style), each: pretrain -> retrieval fine-tune -> rerank eval on 400 test scenes
cd "$(dirname "$0")/.."   # needs runs/quickstart-imagebert (vlp quickstart --system imagebert)
Q=runs/quickstart-imagebert
V=.venv/bin/vlp
S="--set stages.emoji.data.regions=$Q/regions/emoji --set stages.scenes.data.regions=$Q/regions/scenes"
mkdir -p ${ABL:-/tmp/abl}
# the quickstart's own pretraining is the "full" row; its region stores carry the crop embeddings
$V evaluate $Q/retrieval --data data/scenes/dataset.json --split test --regions $Q/regions/scenes \
   --first-stage $Q/dual --rerank-k 16 --fuse 0 1 2 4 8 --bf16 --limit 400 --out ${ABL:-/tmp/abl}/full_rerank.json \
   > ${ABL:-/tmp/abl}/full.log 2>&1
for spec in "no_mrfr:--set objectives.mrfr=0" "no_moc:--set objectives.moc=0" "one_stage:--set stages.emoji.train.steps=0"; do
  name=${spec%%:*}; extra=${spec#*:}
  $V pretrain emoji-imagebert --out ${ABL:-/tmp/abl}/$name --overwrite $S $extra > ${ABL:-/tmp/abl}/$name.log 2>&1
  $V finetune emoji-imagebert-retrieval --init ${ABL:-/tmp/abl}/$name --out ${ABL:-/tmp/abl}/${name}_ft --overwrite \
     --set data.regions=$Q/regions/scenes >> ${ABL:-/tmp/abl}/$name.log 2>&1
  $V evaluate ${ABL:-/tmp/abl}/${name}_ft --data data/scenes/dataset.json --split test --regions $Q/regions/scenes \
     --first-stage $Q/dual --rerank-k 16 --fuse 0 1 2 4 8 --bf16 --limit 400 --out ${ABL:-/tmp/abl}/${name}_rerank.json >> ${ABL:-/tmp/abl}/$name.log 2>&1
  echo "$name done $(date)" >> ${ABL:-/tmp/abl}/done.txt
done
