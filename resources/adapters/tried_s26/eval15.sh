# usage: ENV... eval15.sh NAME FOLDS  (session 22's objects-recipe fold files, 1- and 5-shot nested)
name=$1; shift
cd /work/exp/wt
mkdir -p /work/exp/s26/$name
for f in "$@"; do
  /work/main/.venv/bin/python -m core eval --data /work/shared/data/nwpu_vhr10_dev --fold $f --shots 1,5 --nested 5 --episodes 20 --modes virefsam --adapters /work/exp/folds/fold$f/adapters.pt --tune-steps 0 --threads 2 --quiet --json /work/exp/s26/$name/fold$f.eval.json > /work/exp/s26/$name/fold$f.eval.log 2>&1
  echo "$name fold $f: $(grep -A4 'mIoU' /work/exp/s26/$name/fold$f.eval.log | grep virefsam | tr -s ' ' | tr '\n' ' ') $(date +%T)"
done
