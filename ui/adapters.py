"""The choice of adapter weights, shared by the dock and the Processing algorithm.

``core.params.ModelParams.adapters`` is ``"auto"`` (the files shipped for the model in ``resources/adapters/``:
``{model}_virefsam.pt`` and, where there is one, ``{model}_virefsam_objects.pt``; a check on the reference
weighs them per run, :mod:`core.choice`), ``None`` (training-free) or the path of a ``.pt`` file written by
``python -m core train``. The user sees three choices: Shipped / None / File. Where no adapters are shipped for
the chosen model yet, "Shipped" runs training-free (``core.pipeline.resolve_adapters`` gives None).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

SHIPPED, NONE, FILE = "shipped", "none", "file"
CHOICES = (
    ("Shipped (ViRefSAM)", SHIPPED),
    ("None (training-free)", NONE),
    ("File…", FILE),
)

TOOLTIP = (
    "Which trained VCP + DTA adapter weights guide SAM:\n"
    "• Shipped (ViRefSAM): the adapters that come with the plugin for the chosen model "
    "(resources/adapters/<model>_virefsam.pt, for buildings and land cover, and <model>_virefsam_objects.pt, "
    "for compact objects such as courts, tanks or bridges). Each segments your reference first; how well each "
    "finds your marked objects sets its weight in the run (a clearly worse one is left out), and the message "
    "says which were used. Where none are shipped for that model yet, the run is training-free.\n"
    "• None (training-free): SAM alone, prompted from prototypes of the reference; nothing trained is used.\n"
    "• File…: a .pt file of adapters written by 'python -m core train' (for instance trained on your own "
    "classes); it must have been trained for the chosen model."
)


def missing_file_sentence(path: str) -> str:
    """The engine's sentence for a missing adapter file (``core.pipeline.resolve_adapters``)."""
    return (
        f"The adapter weights file {path} does not exist: choose the .pt file written by training, or no adapters."
    )


NO_FILE_CHOSEN = "Choose the adapter weights file (.pt written by training), or use the shipped adapters or none."


def mode_and_adapters(choice: str, path: str = "") -> Tuple[str, Optional[str]]:
    """``(RunParams.mode, ModelParams.adapters)`` for a choice; raises InputError for a missing file."""
    from ..core.errors import InputError

    if choice == NONE:
        return "training_free", None
    if choice == FILE:
        path = (path or "").strip()
        if not path:
            raise InputError(NO_FILE_CHOSEN)
        if not os.path.isfile(path):
            raise InputError(missing_file_sentence(path))
        return "virefsam", path
    return "virefsam", "auto"


def shipped_file(model_name: str):
    """The shipped adapters of ``model_name`` (a Path), or None."""
    from ..core.pipeline import default_adapters

    return default_adapters(model_name)


def runs_training_free(choice: str, model_name: str) -> bool:
    """Whether a run with this choice is training-free: None, or Shipped while no adapters are shipped for the
    model (True too when the engine cannot be imported to tell)."""
    if choice == NONE:
        return True
    if choice != SHIPPED:
        return False
    try:
        return shipped_file(model_name) is None
    except ImportError:
        return True


def describe_choice(choice: str, model_name: str, path: str = "") -> str:
    """One line for the dock, under the choice: which file a run would use, and in which mode."""
    if choice == NONE:
        return "Runs are training-free: SAM guided by the reference's prototypes, no adapters."
    if choice == FILE:
        path = (path or "").strip()
        if not path:
            return "Choose the .pt file of adapters written by training."
        if not os.path.isfile(path):
            return f"{os.path.basename(path)} does not exist."
        return f"ViRefSAM with {os.path.basename(path)}."
    try:
        shipped = shipped_file(model_name)
    except ImportError:
        return ""
    if shipped is None:
        return f"No adapters are shipped for the model '{model_name}' yet: runs are training-free."
    try:
        from ..core.engines import objects_adapters

        objects = objects_adapters(model_name)
    except ImportError:
        objects = None
    if objects is not None:
        return (f"ViRefSAM with the shipped {shipped.name} and {objects.name}, weighed by how well each finds your "
                "marks.")
    return f"ViRefSAM with the shipped {shipped.name}."


def describe_run(params) -> str:
    """Which adapters file and which mode a run used (``core.params.RunParams``), for the result message."""
    adapters = params.model.adapters
    if params.mode != "virefsam" or adapters in (None, "", "none"):
        return "Mode: training-free (no adapters)."
    if adapters == "auto":  # a finished run's params name the files used; before the run, the weights are open
        return "Mode: ViRefSAM, the shipped adapters weighed by the check on the reference."
    if adapters == "default":
        try:
            shipped = shipped_file(params.model.name)
        except ImportError:
            shipped = None
        if shipped is None:
            return f"Mode: training-free (no adapters are shipped for the model '{params.model.name}' yet)."
        return f"Mode: ViRefSAM, shipped adapters {shipped}."
    weights = getattr(params.model, "adapter_weights", ())
    files = [a.strip() for a in str(adapters).split(",") if a.strip()]
    if len(files) > 1 and len(weights) == len(files):  # after an "auto" run: the blend it used (the note says why)
        return "Mode: ViRefSAM, adapters " + " and ".join(f"{f} ({w:.0%})" for f, w in zip(files, weights)) + "."
    return f"Mode: ViRefSAM, adapters {adapters}."  # after an "auto" run: the one file it used (the note says why)
