#!/bin/bash
# screening: zoomed views off for buildings and for the DTA file on NWPU fold 0
cd /work/main
PY=/work/main/.venv/bin/python
O=/work/exp/s27/r
$PY scripts/reference_spread.py --picks 6 --houses 3 --adapters auto --tune-steps 24 --json $O/spread.auto.views.json > $O/spread.auto.views.log 2>&1
echo "spread views done $(date +%T)"
$PY scripts/reference_spread.py --picks 6 --houses 3 --adapters auto --tune-steps 24 --no-zoom-views --json $O/spread.auto.noviews.json > $O/spread.auto.noviews.log 2>&1
echo "spread noviews done $(date +%T)"
for v in views noviews; do
  extra=""; [ $v = noviews ] && extra="--no-zoom-views"
  $PY -m core eval --data /work/exp/OAM/oam_collages_test --shots 1 --episodes 20 --modes virefsam --adapters auto --threads 2 --quiet $extra --json $O/oam.auto.$v.eval.json > $O/oam.auto.$v.log 2>&1
  echo "oam $v done $(date +%T)"
done
for v in views noviews; do
  extra=""; [ $v = noviews ] && extra="--no-zoom-views"
  $PY -m core eval --data /work/shared/data/nwpu_vhr10_dev --fold 0 --shots 1 --nested 5 --episodes 20 --modes virefsam --adapters resources/adapters/embedded_virefsam.pt --threads 2 --quiet $extra --json $O/fold0.A.$v.eval.json > $O/fold0.A.$v.log 2>&1
  echo "fold0 A $v done $(date +%T)"
done
