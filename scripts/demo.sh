#!/usr/bin/env bash
# The main job, end to end on generated demo data: set up .venv, generate a demo tree (and the
# user capsule `shots` in demo_config/), then one ebm-vae-build run: crawl, statistics, method,
# brief training where the method needs a model, every energy map with its picture, and the
# catalogue energy_maps/landscape.json.
# Outputs go under the repository (checkpoints/, energy_maps/, index/, logs/); data under demo_data/.
# DEMO_SCALE (default 1) scales the demo data; extra arguments go to ebm-vae-build (any train or
# export override, e.g. trainer.max_steps=50).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
DATA=demo_data
CONF=demo_config
start=$(date +%s)

echo "== 1/2 demo data -> $DATA/ (user capsule: $CONF/capsule/shots.yaml)"
python scripts/make_demo_data.py "$DATA" --scale "${DEMO_SCALE:-1}" --config-dir "$CONF"

echo "== 2/2 build every capsule (crawl, statistics, method, training, export, landscape.json)"
ebm-vae-build --config-dir "$CONF" data.root="$DATA" experiment=demo "$@"

cat <<TXT

Done in $(( $(date +%s) - start )) s.
  index:        index/manifest.parquet, index/<capsule>/stats.json
  checkpoints:  checkpoints/<capsule>/{last,epoch_NNN}.ckpt
  energy maps:  energy_maps/<capsule>.npz and .png, the catalogue energy_maps/landscape.json

The commands (ebm-vae-build, -query, -crawl, -train, -export; tensorboard) and the Python package
live in .venv.
In a new shell, enter it first, from $(pwd):
  source .venv/bin/activate
then, for example:
  tensorboard --logdir logs/tensorboard          # loss curves: open http://localhost:6006
  ebm-vae-train --help                           # what you can choose and override
  python -c 'from ebm_vae import EnergyLandscape; print(EnergyLandscape.open("energy_maps").capsules)'
TXT
