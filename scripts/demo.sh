#!/usr/bin/env bash
# The main job, end to end on generated demo data: set up .venv, generate a demo tree, crawl it,
# train every built-in capsule briefly, export every energy map with its picture.
# Outputs go under the repository (checkpoints/, energy_maps/, index/, logs/); data under demo_data/.
# DEMO_SCALE (default 1) scales the demo data; extra arguments go to every ebm-vae-train run.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
DATA=demo_data
start=$(date +%s)

echo "== 1/4 demo data -> $DATA/"
python scripts/make_demo_data.py "$DATA" --scale "${DEMO_SCALE:-1}"

echo "== 2/4 crawl (index + statistics)"
ebm-vae-crawl data.root="$DATA"

echo "== 3/4 train every built-in capsule (one Hydra run each)"
ebm-vae-train -m capsule=fusion,wafer,grid data.root="$DATA" experiment=demo "$@"

echo "== 4/4 export energy maps"
for capsule in fusion wafer grid; do
    ebm-vae-export capsule="$capsule"
done

cat <<TXT

Done in $(( $(date +%s) - start )) s.
  index:        index/manifest.parquet, index/<capsule>/stats.json
  checkpoints:  checkpoints/<capsule>/{last,epoch_NNN}.ckpt
  energy maps:  energy_maps/<capsule>.npz and .png

The commands (ebm-vae-crawl, -train, -export; tensorboard) and the Python package live in .venv.
In a new shell, enter it first, from $(pwd):
  source .venv/bin/activate
then, for example:
  tensorboard --logdir logs/tensorboard          # loss curves: open http://localhost:6006
  ebm-vae-train --help                           # what you can choose and override
TXT
