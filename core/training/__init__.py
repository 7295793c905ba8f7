"""Episodic few-shot data, metrics, training and evaluation of the VCP + DTA adapters.

* :mod:`.episodes`  datasets of images + class-id masks, class folds, deterministic K-shot episodes
* :mod:`.metrics`   the standard few-shot segmentation protocol (per-class mIoU, FB-IoU)
* :mod:`.train`     ``python -m core train``  (episodic meta-training on base classes)
* :mod:`.evaluate`  ``python -m core eval``   (1-/5-shot evaluation on novel classes)
"""
