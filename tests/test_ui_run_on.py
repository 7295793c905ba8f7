"""The dock's "Run on: this computer / Dask cluster at [address]" control (ui/run_on.py, issue #17)."""

import pytest

pytest.importorskip("qgis.core")


def test_run_on_gives_the_cluster_of_the_run_params(qgis_app, virefsam_pkg):
    from qgis.PyQt.QtWidgets import QFormLayout, QWidget

    from virefsam.core.errors import InputError
    from virefsam.ui import run_on

    form_parent = QWidget()
    form = QFormLayout(form_parent)
    w = run_on.add_to_form(form)
    w.combo.setCurrentIndex(w.combo.findData(run_on.THIS_COMPUTER))
    assert w.cluster() == "" and not w.address.isEnabled()
    w.combo.setCurrentIndex(w.combo.findData(run_on.CLUSTER))
    assert w.address.isEnabled()
    w.address.setText("127.0.0.1:8786")  # as `dask worker` takes it
    assert w.cluster() == "tcp://127.0.0.1:8786"
    w.address.setText("")
    with pytest.raises(InputError, match="Type the Dask scheduler's address"):
        w.cluster()
    w.address.setText("tcp://10.0.0.5:8786")
    w._changed()
    again = run_on.RunOnWidget()  # the choice is kept between sessions
    assert again.cluster() == "tcp://10.0.0.5:8786"
    again.combo.setCurrentIndex(again.combo.findData(run_on.THIS_COMPUTER))
