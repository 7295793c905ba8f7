#!/bin/bash
# the default (blend of the shipped DTA file = fold 0's A and session 22's fold-0 objects file, tuned) on fold 0
cd /work/exp/dev
O=/work/exp/s27/r
v=$1
/work/main/.venv/bin/python -m core eval --data /work/shared/data/nwpu_vhr10_dev --fold 0 --shots 1 --nested 5 --episodes 20 --modes virefsam --adapters resources/adapters/embedded_virefsam.pt,/work/exp/folds/fold0/adapters.pt --zoom-views $v --threads 1 --quiet --json $O/fold0.blend.$v.eval.json > $O/fold0.blend.$v.log 2>&1
echo "fold0 blend $v done $(date +%T)"
