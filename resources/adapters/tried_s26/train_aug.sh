cd /work/exp/wt
S=/work/shared/data; O=/work/exp/OAM
name=$1; shift
for f in "$@"; do
  /work/main/.venv/bin/python -m core train --data $S/nwpu_vhr10_dev --fold $f --no-dta --shots 3 --episodes 300 --seed 0 \
    --also $S/dubai_landcover --also $S/spacenet_atlanta --also $S/swiss_trees --also $O/oam_buildings_train --also $O/oam_collages_train \
    --save-every 100 --quiet --out /work/exp/s26/$name/fold$f > /work/exp/s26/$name/fold$f.log 2>&1
  echo "train $name fold $f done $(date +%T) $(tail -1 /work/exp/s26/$name/fold$f.log)"
  /work/main/.venv/bin/python -m core eval --data $S/nwpu_vhr10_dev --fold $f --shots 1,5 --nested 5 --episodes 20 --modes virefsam --adapters /work/exp/s26/$name/fold$f/adapters.pt --tune-steps 0 --threads 2 --quiet --json /work/exp/s26/$name/fold$f.eval.json > /work/exp/s26/$name/fold$f.eval.log 2>&1
  echo "$name fold $f: $(grep -A4 'mIoU' /work/exp/s26/$name/fold$f.eval.log | grep virefsam | tr -s ' ' | tr '\n' ' ') $(date +%T)"
done
