# usage: ENV... oam.sh NAME [ADAPTERS]
name=$1; ad=${2:-auto}
cd /work/exp/wt
/work/main/.venv/bin/python -m core eval --data /work/exp/OAM/oam_collages_test --shots 1 --episodes 20 --modes virefsam --adapters $ad --threads 2 --quiet --json /work/exp/s26/$name.oam_collages_test.eval.json > /work/exp/s26/$name.oam.log 2>&1
echo "$name oam: $(grep -A3 'mIoU' /work/exp/s26/$name.oam.log | grep virefsam | tr -s ' ' | tr '\n' ' ') $(date +%T)"
