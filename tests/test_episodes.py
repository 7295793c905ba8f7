"""Episode readers and sampling: synthetic folders for the rules, the shared data for the real layouts."""

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image

from core.errors import InputError
from core.training import episodes as E


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """8 images 40x40; class 1 large in images 0-5, small (20 px) in image 6; class 2 in images 4-7;
    value 9 marks unlabelled pixels (ignored)."""
    monkeypatch.setenv("VIREFSAM_HOME", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    items = []
    rng = np.random.default_rng(0)
    for i in range(8):
        img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        lab = np.zeros((40, 40), np.uint8)
        if i < 6:
            lab[:20, :20] = 1
        if i == 6:
            lab[0, :20] = 1
        if i >= 4:
            lab[25:, 25:] = 2
        lab[39, 0] = 9
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(lab).save(root / "masks" / f"{i}.png")
        items.append(E.Item(f"images/{i}.png", root / "images" / f"{i}.png", root / "masks" / f"{i}.png"))
    return E.SegDataset("tiny", root, items, {1: "one", 2: "two"}, ignore_ids=(9,), folds=((1,), (2,)),
                        min_pixels=100)


def test_min_pixels_and_counts(tiny):
    assert tiny.images_with(1) == [0, 1, 2, 3, 4, 5]
    assert tiny.images_with(1, min_pixels=1) == [0, 1, 2, 3, 4, 5, 6]
    assert tiny.images_with(2) == [4, 5, 6, 7]
    assert tiny.pixel_counts()[6].tolist() == [20, 225]


def test_episodes_are_deterministic_and_valid(tiny):
    a = E.sample_episodes(tiny, n=10, shots=2, seed=3)
    b = E.sample_episodes(tiny, n=10, shots=2, seed=3)
    c = E.sample_episodes(tiny, n=10, shots=2, seed=4)
    assert a == b and a != c
    assert E.episodes_sha256(a) == E.episodes_sha256(b)
    for ep in a:
        assert ep.query not in ep.support and len(set(ep.support)) == 2
        assert set(ep.support) | {ep.query} <= set(tiny.images_with(ep.class_id))
    # balanced: 10 per class; queries run through permutations (6 eligible images of class 1: each once first)
    ones = [e for e in a if e.class_id == 1]
    assert len(ones) == 10 and sorted(e.query for e in ones[:6]) == [0, 1, 2, 3, 4, 5]
    # one class's episodes do not depend on which other classes are sampled
    only1 = E.sample_episodes(tiny, classes=[1], n=10, shots=2, seed=3)
    assert only1 == ones
    assert E.sample_episodes(tiny, classes=["two"], n=3) == E.sample_episodes(tiny, classes=[2], n=3)


def test_fold_protocol_and_training_stream(tiny):
    eps = E.sample_episodes(tiny, classes=[1, 2], n=25, per_class=False, seed=1)
    assert len(eps) == 25 and {e.class_id for e in eps} == {1, 2}
    stream = list(itertools.islice(E.iter_episodes(tiny, tiny.base_classes(1), seed=5), 12))
    assert all(e.class_id == 1 for e in stream)
    resumed = list(itertools.islice(E.iter_episodes(tiny, [1], seed=5, start=7), 5))
    assert resumed == stream[7:12]
    assert tiny.novel_classes(0) == [1] and tiny.base_classes(0) == [2]
    assert tiny.novel_classes(None) == [1, 2] and tiny.base_classes(None) == []
    with pytest.raises(InputError):
        tiny.novel_classes(2)


def test_too_few_images_is_a_clear_error(tiny):
    with pytest.raises(InputError, match="needs 7"):
        E.sample_episodes(tiny, classes=[1], n=2, shots=6)


def test_load_episode_types_and_ignore(tiny):
    ep = E.sample_episodes(tiny, classes=[2], n=1)[0]
    data = E.load_episode(tiny, ep)
    assert data.query_image.dtype == np.uint8 and data.query_image.shape == (40, 40, 3)
    assert data.query_mask.dtype == bool and data.query_mask.sum() == 225
    assert data.support_masks[0].dtype == bool
    assert data.query_ignore is not None and data.query_ignore.sum() == 1
    (img, mask), = data.references
    assert img.shape == (40, 40, 3) and mask.shape == (40, 40)
    assert E.Episode.from_dict(ep.to_dict()) == ep


def test_rgb_palette_masks(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = E.ISAID_PALETTE[14]
    rgb[1, 1] = (1, 2, 3)  # not in the palette -> ignored
    Image.fromarray(rgb).save(tmp_path / "m.png")
    lab = E.read_label(tmp_path / "m.png", E.ISAID_PALETTE)
    assert lab[0, 0] == 14 and lab[1, 1] == E.IGNORE and lab[2, 2] == 0
    with pytest.raises(InputError):
        E.read_label(tmp_path / "m.png")


def test_isaid_and_loveda_layouts(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[:4] = 3
    d = tmp_path / "iSAID" / "val"
    (d / "images").mkdir(parents=True)
    (d / "semantic_png").mkdir()
    Image.fromarray(img).save(d / "images" / "P1_0_8_0_8.png")
    Image.fromarray(lab).save(d / "semantic_png" / "P1_0_8_0_8_instance_color_RGB.png")
    ds = E.open_dataset(tmp_path / "iSAID")
    assert ds.name == "isaid_val" and len(ds) == 1 and ds.folds == E.ISAID_FOLDS
    assert ds.class_mask(0, 3)[0].sum() == 32
    d = tmp_path / "LoveDA" / "Val" / "Rural"
    (d / "images_png").mkdir(parents=True)
    (d / "masks_png").mkdir()
    Image.fromarray(img).save(d / "images_png" / "5.png")
    Image.fromarray(lab).save(d / "masks_png" / "5.png")
    ds = E.open_dataset(tmp_path / "LoveDA", split="val")
    assert ds.name == "loveda_val" and ds.novel_classes(0) == [2, 3, 4]
    m, ign = ds.class_mask(0, 3)
    assert m.sum() == 32 and ign.sum() == 32  # value 0 = no-data is ignored


# --- the shared data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n,classes", [
    ("nwpu_vhr10_dev", 412, [4, 5, 6, 7, 8, 9]),
    ("dubai_landcover", 72, [1, 2, 3, 4, 5]),
    ("oam_buildings", 48, [1]),
    ("spacenet_atlanta", 9, [1]),
    ("swiss_trees", 4, [1]),
])
def test_shared_datasets(shared_data, name, n, classes):
    ds = E.open_dataset(shared_data / name)
    assert len(ds) == n and list(ds.classes) == classes
    ep = E.sample_episodes(ds, classes=[classes[0]], n=2, seed=0)[1]
    data = E.load_episode(ds, ep)
    assert data.query_image.dtype == np.uint8 and data.query_image.ndim == 3 and data.query_image.shape[2] == 3
    assert data.query_mask.dtype == bool and data.query_mask.sum() >= ds.min_pixels
    assert data.query_mask.shape == data.query_image.shape[:2]


def test_nwpu_folds_partition_the_classes(shared_data):
    ds = E.open_dataset(shared_data / "nwpu_vhr10_dev")
    novel = [c for f in range(3) for c in ds.novel_classes(f)]
    assert sorted(novel) == [4, 5, 6, 7, 8, 9]
    assert ds.base_classes(2) == [4, 5, 6, 7]
    eps = E.sample_episodes(ds, classes=ds.novel_classes(2), n=40, seed=0)
    assert len(eps) == 80 and E.episodes_sha256(eps) == E.episodes_sha256(
        E.sample_episodes(ds, classes=[8, 9], n=40, seed=0))


def test_dubai_unlabelled_is_ignored(shared_data):
    ds = E.open_dataset(shared_data / "dubai_landcover")
    i = ds.images_with(1)[0]
    m, ign = ds.class_mask(i, 1)
    assert ign is not None and not (m & ign).any()


def test_generic_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VIREFSAM_HOME", str(tmp_path / "cache"))
    root = tmp_path / "my_data"
    (root / "im").mkdir(parents=True)
    rows = ["image,mask"]
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "im" / f"{i}.png")
        lab = np.zeros((8, 8), np.uint8)
        lab[:4] = 7
        Image.fromarray(lab).save(root / "im" / f"{i}_m.png")
        rows.append(f"im/{i}.png,im/{i}_m.png")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.json").write_text('{"classes": {"7": "pond"}, "folds": [[7]], "min_pixels": 10}')
    ds = E.open_dataset(root)
    assert ds.name == "my_data" and ds.classes == {7: "pond"} and ds.images_with(7) == [0, 1, 2]
    assert ds.novel_classes(0) == [7]


def test_mixed_stream_over_datasets(tiny):
    """--also: episodes uniform over (dataset, class) pairs, each inside one dataset, deterministic, resumable;
    with one dataset it is the plain stream."""
    other = E.SegDataset("other", tiny.root, tiny.items, {1: "one", 2: "two"}, ignore_ids=(9,), min_pixels=100)
    pools = [(tiny, [2]), (other, [1, 2])]
    stream = list(itertools.islice(E.iter_mixed_episodes(pools, seed=5), 60))
    assert stream == list(itertools.islice(E.iter_mixed_episodes(pools, seed=5), 60))
    assert {(e.dataset, e.class_id) for e in stream} == {("tiny", 2), ("other", 1), ("other", 2)}
    assert all(e.class_id == 2 for e in stream if e.dataset == "tiny")
    for e in stream:
        ds = tiny if e.dataset == "tiny" else other
        assert e.query not in e.support and set(e.support) | {e.query} <= set(ds.images_with(e.class_id))
    assert list(itertools.islice(E.iter_mixed_episodes(pools, seed=5, start=9), 4)) == stream[9:13]
    single = list(itertools.islice(E.iter_mixed_episodes([(tiny, [1, 2])], seed=5), 12))
    assert single == list(itertools.islice(E.iter_episodes(tiny, [1, 2], seed=5), 12))
    with pytest.raises(InputError, match="named twice"):
        next(E.iter_mixed_episodes([(tiny, [1]), (tiny, [2])]))


def test_groups_never_pair(tiny):
    """An index's ``group`` column: a support never comes from the query's group (collages of the same source
    tiles, crops of one scene); without groups the episodes are those of before."""
    plain = E.sample_episodes(tiny, n=12, seed=3)
    grouped_items = [dataclasses.replace(it, group=f"g{i // 2}") for i, it in enumerate(tiny.items)]
    g = E.SegDataset("tiny", tiny.root, grouped_items, tiny.classes, ignore_ids=(9,), folds=tiny.folds,
                     min_pixels=100)
    same = E.SegDataset("tiny", tiny.root, [dataclasses.replace(it, group=None) for it in tiny.items],
                        tiny.classes, ignore_ids=(9,), folds=tiny.folds, min_pixels=100)
    assert E.sample_episodes(same, n=12, seed=3) == plain
    eps = E.sample_episodes(g, n=12, seed=3, shots=2) + list(itertools.islice(E.iter_episodes(g, [1, 2], seed=3), 40))
    groups = g.groups()
    for e in eps:
        assert all(groups[s] != groups[e.query] for s in e.support)
    one = E.SegDataset("tiny", tiny.root, [dataclasses.replace(it, group="all") for it in tiny.items],
                       tiny.classes, ignore_ids=(9,), min_pixels=100)
    with pytest.raises(InputError, match="outside its group"):
        E.sample_episodes(one, n=1)


def test_group_column_in_index(tmp_path):
    root = tmp_path / "collages"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(root / "images" / f"{i}.png")
        lab = np.zeros((40, 40), np.uint8)
        lab[:30, :30] = 1
        Image.fromarray(lab).save(root / "masks" / f"{i}.png")
    rows = "\n".join(f"images/{i}.png,masks/{i}.png,{'ab'[i % 2]}" for i in range(4))
    (root / "index.csv").write_text("image,mask,group\n" + rows + "\n")
    (root / "classes.json").write_text('{"classes": {"1": "building"}, "min_pixels": 100}')
    ds = E.open_dataset(root)
    assert [it.group for it in ds.items] == ["a", "b", "a", "b"]
    for e in E.sample_episodes(ds, n=8):
        assert (e.query - e.support[0]) % 2 == 1


def _collage_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "oam_collages.py"
    spec = importlib.util.spec_from_file_location("oam_collages", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collage_keeps_pixels_and_labels_together():
    """Every turned / flipped tile of a collage carries its own mask: a tile whose red band is its mask gives a
    collage whose red band is the collage's mask."""
    oc = _collage_script()
    rng = np.random.default_rng(1)
    tiles = []
    for _ in range(3):
        m = (rng.random((256, 256)) > 0.7).astype(np.uint8)
        im = np.stack([m * 255, rng.integers(0, 255, (256, 256)), np.zeros((256, 256))]).astype(np.uint8)
        tiles.append((im, m))
    img, msk = oc.collage(tiles, 3, np.random.default_rng(0))
    assert img.shape == (768, 768, 3) and msk.shape == (768, 768)
    assert np.array_equal(img[..., 0] == 255, msk == 1)
    img2, _ = oc.collage(tiles, 3, np.random.default_rng(0))
    assert np.array_equal(img, img2)


def test_collage_folders_from_shared_tiles(shared_data, tmp_path, monkeypatch):
    """scripts/oam_collages.py on the real OpenAerialMap tiles: a generic dataset folder whose groups keep a
    target's source tiles out of its references."""
    oc = _collage_script()
    monkeypatch.setattr(oc, "SRC", shared_data / "oam_buildings")
    monkeypatch.setattr(oc, "SPLITS", {"oam_collages_x": {"areas": ("4",), "grids": {2: 2}}})
    oc.main(str(tmp_path))
    ds = E.open_dataset(tmp_path / "oam_collages_x")
    assert ds.name == "oam_collages_x" and len(ds) == 4 and ds.classes == {1: "building"}
    assert sorted({it.group for it in ds.items}) == ["area4a", "area4b"]
    assert ds.image(0).shape == (512, 512, 3)
    for e in E.sample_episodes(ds, n=4):
        assert ds.items[e.query].group != ds.items[e.support[0]].group


def test_training_stream_with_several_shot_counts(tiny):
    """``--shots 1,2``: each training episode draws one of the counts (both occur), deterministic and resumable,
    over one dataset or several; a single count keeps the stream it always had."""
    other = E.SegDataset("other", tiny.root, tiny.items, {1: "one", 2: "two"}, ignore_ids=(9,), min_pixels=100)
    for make in (lambda **k: E.iter_episodes(tiny, [1, 2], seed=5, **k),
                 lambda **k: E.iter_mixed_episodes([(tiny, [2]), (other, [1, 2])], seed=5, **k)):
        stream = list(itertools.islice(make(shots=(1, 2)), 40))
        assert {len(e.support) for e in stream} == {1, 2}
        assert all(e.query not in e.support and len(set(e.support)) == len(e.support) for e in stream)
        assert list(itertools.islice(make(shots=[1, 2], start=9), 4)) == stream[9:13]
        assert list(itertools.islice(make(shots=(2,)), 12)) == list(itertools.islice(make(shots=2), 12))
    with pytest.raises(InputError, match="at least 1 shot"):
        next(E.iter_episodes(tiny, [1], shots=(0, 1)))


RACE = r"""
import sys
from core.training.datasets import open_dataset
from core.training.feature_cache import FeatureCache
import torch
ds = open_dataset(sys.argv[1])
fc = FeatureCache(sys.argv[2], "race")
for i in range(40):  # both processes write the same cache entries over and over, at the same moments
    ds._counts = None
    for p in __import__("pathlib").Path(sys.argv[3]).glob("episode_index/*.json"):
        p.unlink(missing_ok=True)
    ds.pixel_counts()
    fc.put("shapes", "k0", torch.zeros(4, 8, 8))
print("ok")
"""


def test_two_runs_writing_the_same_cache_entries_at_once(tiny_folder, tmp_path):
    """Two evaluations started together (two folds on two cores) compute the same dataset index and features: each
    writes under its own temporary name, so neither finds its file moved away by the other (it did, session 14)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    home = tmp_path / "home"
    env = dict(os.environ, VIREFSAM_HOME=str(home))
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tiny_folder), str(tmp_path / "features"), str(home)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    assert not [p for p in home.rglob("*") if ".tmp" in p.name] and not list((tmp_path / "features").rglob("*.tmp*"))
