# usage: ENV... eval_folds.sh NAME FOLDS (baseline fold files, 1-shot nested 5)
name=$1; shift
cd /work/exp/wt
for f in "$@"; do
  /work/main/.venv/bin/python -m core eval --data /work/shared/data/nwpu_vhr10_dev --fold $f --shots 1 --nested 5 --episodes 20 --modes virefsam --adapters /work/exp/folds/fold$f/adapters.pt --tune-steps 0 --threads 2 --quiet --json /work/exp/s25/$name.fold$f.eval.json > /work/exp/s25/$name.fold$f.log 2>&1
  echo "$name fold $f: $(grep -A3 'mIoU' /work/exp/s25/$name.fold$f.log | grep virefsam | tr -s ' ' | tr '\n' ' ') $(date +%T)"
done
