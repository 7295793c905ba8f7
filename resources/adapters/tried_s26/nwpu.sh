# usage: ENV... nwpu.sh NAME FOLD ADAPTERS
name=$1; f=$2; ad=$3
cd /work/exp/wt
/work/main/.venv/bin/python -m core eval --data /work/shared/data/nwpu_vhr10_dev --fold $f --shots 1 --nested 5 --episodes 20 --modes virefsam --adapters $ad --tune-steps 0 --threads 2 --quiet --json /work/exp/s26/$name.fold$f.eval.json > /work/exp/s26/$name.fold$f.log 2>&1
echo "$name fold $f: $(grep -A3 'mIoU' /work/exp/s26/$name.fold$f.log | grep virefsam | tr -s ' ' | tr '\n' ' ') $(grep 'precision / recall' /work/exp/s26/$name.fold$f.log | head -1) $(date +%T)"
