"""K-shot episodes drawn from a :class:`~.datasets.SegDataset` (datasets, readers and folds: :mod:`.datasets`).

Episodes (:class:`Episode`) name a class, K support ("reference") images and one query ("target") image,
always a different file from every support. Where the index gives images a ``group`` (an optional column of
``index.csv``: e.g. collages cut from the same source tiles, or crops of one scene), supports are also drawn
from other groups than the query's, so a reference never shows the target's own pixels. An image counts for a
class only where the class covers at least ``min_pixels`` pixels. Sampling is deterministic: the same dataset,
classes, seed and arguments give the same episodes on every machine, and the episodes of one class do not change when other classes are added.

Every name of :mod:`.datasets` is importable from here too (``episodes`` held both before the split).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .datasets import (  # noqa: F401  (re-exported: callers import them from episodes)
    DUBAI_CLASSES,
    IGNORE,
    ISAID_CLASSES,
    ISAID_FOLDS,
    ISAID_PALETTE,
    LOVEDA_CLASSES,
    LOVEDA_FOLDS,
    NWPU_CLASSES,
    NWPU_FOLDS,
    READERS,
    Item,
    SegDataset,
    dubai_landcover,
    generic_folder,
    isaid,
    loveda,
    nwpu_vhr10_dev,
    oam_buildings,
    open_dataset,
    read_image,
    read_label,
    spacenet_atlanta,
    swiss_trees,
)


@dataclass(frozen=True)
class Episode:
    """One K-shot episode: support images (references) and a query image (target), all different files."""

    dataset: str
    class_id: int
    class_name: str
    support: Tuple[int, ...]
    query: int

    @property
    def shots(self) -> int:
        return len(self.support)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["support"] = list(self.support)
        return d

    @staticmethod
    def from_dict(d: Mapping) -> "Episode":
        return Episode(d["dataset"], int(d["class_id"]), d["class_name"], tuple(int(s) for s in d["support"]),
                       int(d["query"]))


@dataclass
class EpisodeData:
    """The pixels of an episode: images ``HxWx3 uint8``, masks ``HxW bool`` for the episode's class."""

    episode: Episode
    support_images: List[np.ndarray]
    support_masks: List[np.ndarray]
    query_image: np.ndarray
    query_mask: np.ndarray
    query_ignore: Optional[np.ndarray]  # pixels excluded from the metrics (None: nothing ignored)

    @property
    def references(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``[(image, mask), ...]`` as :meth:`ReferencePredictor.set_references` takes them."""
        return list(zip(self.support_images, self.support_masks))


def _class_seed(seed: int, *parts) -> np.random.Generator:
    tag = zlib.crc32("/".join(str(p) for p in parts).encode())
    return np.random.default_rng([int(seed), int(tag)])


def _shot_counts(shots) -> Tuple[int, ...]:
    """``shots``: one count (int) or several (each training episode draws one of them uniformly)."""
    counts = (int(shots),) if isinstance(shots, (int, np.integer)) else tuple(int(k) for k in shots)
    if not counts or min(counts) < 1:
        raise InputError("Episodes need at least 1 shot.")
    return counts


def _draw_shots(rng: np.random.Generator, counts: Tuple[int, ...]) -> int:
    """One count of ``counts``; a single count draws nothing, so its stream is the one it always was."""
    return counts[0] if len(counts) == 1 else counts[int(rng.integers(len(counts)))]


def _stream_tag(counts: Tuple[int, ...]):
    return counts[0] if len(counts) == 1 else "shots" + "-".join(str(k) for k in counts)


def _need(ds: SegDataset, cid: int, eligible: Sequence[int], shots: int, min_pixels) -> None:
    if len(eligible) < shots + 1:
        mp = ds.min_pixels if min_pixels is None else min_pixels
        raise InputError(f"The class {ds.classes[cid]} of {ds.name} covers at least {mp} pixels in only "
                         f"{len(eligible)} images; a {shots}-shot episode needs {shots + 1}.")


def sample_episodes(ds: SegDataset, classes: Optional[Sequence[int]] = None, n: int = 40, shots: int = 1,
                    seed: int = 0, min_pixels: Optional[int] = None, per_class: bool = True) -> List[Episode]:
    """Deterministic test episodes.

    per_class=True (default, balanced): ``n`` episodes for every class in ``classes``; queries run through
    random permutations of the class's eligible images (each image is a query once before any is twice), the
    K supports are drawn from the other eligible images. The random stream of a class depends only on
    (seed, dataset name, class id).

    per_class=False (the PASCAL-5i / iSAID-5i protocol, e.g. ``n=1000`` per fold): ``n`` episodes in all;
    each draws a query image among those holding any of ``classes``, then a class among the classes it holds,
    then the supports.
    """
    classes = list(ds.classes) if classes is None else [ds.class_id(c) for c in classes]
    if shots < 1 or n < 1:
        raise InputError("Episodes need at least 1 shot and n >= 1.")
    eligible = {c: ds.images_with(c, min_pixels) for c in classes}
    for c in classes:
        _need(ds, c, eligible[c], shots, min_pixels)
    episodes: List[Episode] = []
    if per_class:
        for c in classes:
            rng = _class_seed(seed, ds.name, c, shots)
            pool = np.asarray(eligible[c])
            queries: List[int] = []
            while len(queries) < n:
                queries.extend(int(q) for q in rng.permutation(pool))
            for q in queries[:n]:
                others = ds.others(pool, q, shots)
                sup = rng.choice(others, size=shots, replace=False)
                episodes.append(Episode(ds.name, c, ds.classes[c], tuple(int(s) for s in sup), int(q)))
        return episodes
    rng = _class_seed(seed, ds.name, "fold", *classes, shots)
    holders: Dict[int, List[int]] = {}
    for c in classes:
        for i in eligible[c]:
            holders.setdefault(i, []).append(c)
    images = np.asarray(sorted(holders))
    for _ in range(n):
        q = int(rng.choice(images))
        c = int(rng.choice(holders[q]))
        pool = np.asarray(eligible[c])
        sup = rng.choice(ds.others(pool, q, shots), size=shots, replace=False)
        episodes.append(Episode(ds.name, c, ds.classes[c], tuple(int(s) for s in sup), q))
    return episodes


def iter_episodes(ds: SegDataset, classes: Sequence[int], shots=1, seed: int = 0,
                  min_pixels: Optional[int] = None, start: int = 0) -> Iterator[Episode]:
    """An endless deterministic stream of training episodes over ``classes`` (uniform class, then query).

    ``shots``: the support count, or several counts (e.g. ``(1, 3)``: each episode draws one, uniformly).
    ``start`` skips that many episodes (no file is read), so a resumed training sees the same stream.
    """
    counts = _shot_counts(shots)
    classes = [ds.class_id(c) for c in classes]
    if not classes:
        raise InputError("Training needs at least one base class.")
    eligible = {c: np.asarray(ds.images_with(c, min_pixels)) for c in classes}
    for c in classes:
        _need(ds, c, eligible[c], max(counts), min_pixels)
    rng = _class_seed(seed, ds.name, "train", *classes, _stream_tag(counts))
    k = 0
    while True:
        c = classes[int(rng.integers(len(classes)))]
        pool = eligible[c]
        q = int(rng.choice(pool))
        n = _draw_shots(rng, counts)
        sup = rng.choice(ds.others(pool, q, n), size=n, replace=False)
        if k >= start:
            yield Episode(ds.name, c, ds.classes[c], tuple(int(s) for s in sup), q)
        k += 1


def iter_mixed_episodes(pools: Sequence[Tuple[SegDataset, Sequence[int]]], shots=1, seed: int = 0,
                        min_pixels: Optional[int] = None, start: int = 0) -> Iterator[Episode]:
    """An endless deterministic stream over several datasets: uniform over (dataset, class) pairs, then query.

    ``pools`` is ``[(dataset, training classes), ...]``; every episode stays inside one dataset (references and
    target from the same dataset, all different images). With one pool this is :func:`iter_episodes`.
    ``shots`` and ``start`` as there.
    """
    counts = _shot_counts(shots)
    pools = [(ds, [ds.class_id(c) for c in classes]) for ds, classes in pools]
    if len(pools) == 1:
        yield from iter_episodes(pools[0][0], pools[0][1], shots=shots, seed=seed, min_pixels=min_pixels,
                                 start=start)
        return
    names = [ds.name for ds, _ in pools]
    if len(set(names)) != len(names):
        raise InputError(f"A dataset is named twice among {', '.join(names)}.")
    pairs = [(ds, c) for ds, classes in pools for c in classes]
    if not pairs:
        raise InputError("Training needs at least one base class.")
    eligible = {}
    for ds, c in pairs:
        e = ds.images_with(c, min_pixels)
        _need(ds, c, e, max(counts), min_pixels)
        eligible[(ds.name, c)] = np.asarray(e)
    rng = _class_seed(seed, "mixed", *[f"{ds.name}:{c}" for ds, c in pairs], _stream_tag(counts))
    k = 0
    while True:
        ds, c = pairs[int(rng.integers(len(pairs)))]
        pool = eligible[(ds.name, c)]
        q = int(rng.choice(pool))
        n = _draw_shots(rng, counts)
        sup = rng.choice(ds.others(pool, q, n), size=n, replace=False)
        if k >= start:
            yield Episode(ds.name, c, ds.classes[c], tuple(int(s) for s in sup), q)
        k += 1


def load_episode(ds: SegDataset, ep: Episode) -> EpisodeData:
    """Read an episode's images and its class's masks (other classes' pixels are background)."""
    if ep.query in ep.support:
        raise InputError("An episode's query image must not be one of its supports.")
    sup_imgs, sup_masks = [], []
    for s in ep.support:
        img = ds.image(s)
        m, _ = ds.class_mask(s, ep.class_id)
        _check_shapes(ds, s, img, m)
        sup_imgs.append(img)
        sup_masks.append(m)
    qimg = ds.image(ep.query)
    qmask, qign = ds.class_mask(ep.query, ep.class_id)
    _check_shapes(ds, ep.query, qimg, qmask)
    return EpisodeData(ep, sup_imgs, sup_masks, qimg, qmask, qign)


def _check_shapes(ds: SegDataset, i: int, img: np.ndarray, mask: np.ndarray) -> None:
    if img.shape[:2] != mask.shape:
        raise InputError(f"{ds.items[i].key}: image {img.shape[:2]} and mask {mask.shape} differ in size.")


def episodes_sha256(episodes: Sequence[Episode]) -> str:
    """A fingerprint of an episode list (written into evaluation reports)."""
    payload = json.dumps([e.to_dict() for e in episodes], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()

