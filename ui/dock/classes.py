"""Several classes in one run: the dock's list of classes, each with its own references (and negatives).

The marking tools, the reference list and Undo always work on the class shown; "Add class" starts another one,
the "Class" combo switches between them (the shown class's marks are kept aside meanwhile, with their undo
steps: :meth:`~ui.references.ReferenceSet.take_state` / ``load_state``). A run takes every class that has a
name and an example (one class: as before; several: :class:`core.params.ClassSpec` each, one layer per target
with a ``class_name`` attribute, styled by class; "Classes may overlap" keeps overlapping polygons; "One layer
per class" writes one layer per target and class instead, ``RunParams.layer_per_class``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QPushButton, QSizePolicy


class ClassesSection:
    """The class list of section 1. A mixin of :class:`~ui.dock.ViRefSamDock`: ``self`` is the dock."""

    def _build_classes_row(self, form) -> None:
        row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.setObjectName("classes")
        self.class_combo.setToolTip("The classes of the run; the marks and the list below belong to the one shown.")
        self.add_class_button = QPushButton("Add class")
        self.add_class_button.setToolTip("Map another class in the same run (its own references and negatives).")
        self.remove_class_button = QPushButton("Remove class")
        for w in (self.class_combo, self.add_class_button, self.remove_class_button):
            w.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)
            row.addWidget(w, 2 if w is self.class_combo else 1)
        form.addRow("Classes", row)
        self.allow_overlap_check = QCheckBox("Classes may overlap")
        self.allow_overlap_check.setToolTip(
            "Keep polygons of different classes that overlap; otherwise each pixel goes to the more probable class.")
        self.layer_per_class_check = QCheckBox("One layer per class")
        self.layer_per_class_check.setObjectName("layer_per_class")
        self.layer_per_class_check.setToolTip(
            "One layer per class and target raster, each in its class's group; otherwise one layer per target "
            "with a class_name attribute, styled by class.")
        overlap_row = QHBoxLayout()
        overlap_row.addWidget(self.allow_overlap_check)
        overlap_row.addWidget(self.layer_per_class_check)
        form.addRow("", overlap_row)
        # the classes not shown: [name, state of ReferenceSet.take_state()]; the shown one lives in the widgets
        self._classes: List[list] = [["", None]]
        self._class_index = 0

    def _connect_classes(self) -> None:
        self.add_class_button.clicked.connect(self.add_class)
        self.remove_class_button.clicked.connect(self.remove_class)
        self.class_combo.activated.connect(self.show_class)
        self.class_edit.textChanged.connect(self._class_renamed)
        self._refresh_class_combo()

    # -- the list -------------------------------------------------------------------------------------------------
    def class_names(self) -> List[str]:
        return [self.class_edit.text().strip() if i == self._class_index else c[0] for i, c in enumerate(self._classes)]

    def _refresh_class_combo(self) -> None:
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for i, name in enumerate(self.class_names()):
            self.class_combo.addItem(name or f"(class {i + 1}, no name yet)")
        self.class_combo.setCurrentIndex(self._class_index)
        self.class_combo.blockSignals(False)
        self.remove_class_button.setEnabled(len(self._classes) > 1)

    def _class_renamed(self, text: str) -> None:
        if hasattr(self, "class_combo"):
            self.class_combo.setItemText(self._class_index, text.strip() or f"(class {self._class_index + 1}, no name yet)")

    def _stash_shown_class(self) -> None:
        self._classes[self._class_index] = [self.class_edit.text().strip(), self.references.take_state()]

    def show_class(self, index: int) -> None:
        """Show class ``index``: its name, references and undo steps (the shown one is kept aside)."""
        if not 0 <= index < len(self._classes) or index == self._class_index:
            self._refresh_class_combo()
            return
        self._stash_shown_class()
        self._class_index = index
        name, state = self._classes[index]
        self.class_edit.setText(name)
        self.references.load_state(state)
        self._refresh_class_combo()

    def add_class(self, name: str = "") -> int:
        """A new, empty class, shown at once (type its name, mark an example). Returns its index."""
        self._stash_shown_class()
        self._classes.append([name, None])
        self._class_index = len(self._classes) - 1
        self.class_edit.setText(name)
        self.references.load_state(None)
        self._refresh_class_combo()
        return self._class_index

    def remove_class(self) -> None:
        """Remove the shown class (there is always one)."""
        if len(self._classes) < 2:
            return
        del self._classes[self._class_index]
        self._class_index = min(self._class_index, len(self._classes) - 1)
        name, state = self._classes[self._class_index]
        self.class_edit.setText(name)
        self.references.load_state(state)
        self._refresh_class_combo()

    def find_class(self, name: str) -> Optional[int]:
        names = self.class_names()
        return names.index(name) if name in names else None

    def class_references(self) -> List[Tuple[str, list]]:
        """(name, usable ReferenceDrafts) of every class, the shown one as it is now."""
        out = []
        for i, (name, state) in enumerate(self._classes):
            if i == self._class_index:
                out.append((self.class_edit.text().strip(), self.references.usable()))
            else:
                refs = state[0] if state else []
                out.append((name, [r for r in refs if r.marks]))
        return out
