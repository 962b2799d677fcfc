"""Open the *installed* module in a Python without torch, MONAI or medgmae, and report what happened as JSON.

Run by ``test_installed_layout.py`` as ``python -S -s installed_module_driver.py LAYOUT SITE STANDINS EXTENSIONS``:
``-S`` keeps site-packages off ``sys.path``; ``SITE`` is a copy of the test environment's site-packages that holds
only what Slicer itself ships (numpy, VTK, SimpleITK, slicer-core's MRML, packaging...) and no torch, MONAI,
numba, nibabel, medgmae_core or their metadata. ``LAYOUT`` is the extension's installed qt-scripted-modules folder,
which Slicer puts on ``sys.path``; ``STANDINS`` holds the application stand-ins and ``EXTENSIONS`` the stand-in of
the PyTorch extension (a declared dependency, so it is there when MedGMAE is installed from the Extensions Manager).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import traceback


def main(layout: str, site: str, standins: str, extensions: str) -> dict:
    sys.path[:0] = [layout, site, standins, extensions]
    report: dict = {}

    # 1. the environment is what the test claims
    for name in ("torch", "monai", "numba", "nibabel", "einops"):
        report[f"{name}_spec"] = importlib.util.find_spec(name) is not None
        try:
            importlib.metadata.version(name)
            report[f"{name}_metadata"] = True
        except importlib.metadata.PackageNotFoundError:
            report[f"{name}_metadata"] = False
    try:
        importlib.metadata.version("medgmae-core")
        report["medgmae_core_installed"] = True
    except importlib.metadata.PackageNotFoundError:
        report["medgmae_core_installed"] = False
    spec = importlib.util.find_spec("medgmae_core")
    report["medgmae_core_location"] = list(spec.submodule_search_locations)[0] if spec else None

    # 2. the application around the module: a real slicer-core scene, stand-ins for the rest
    import numpy as np
    import slicer
    from slicer_app_standin import Patcher, install, open_module

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = install(Patcher(), module_path=f"{layout}/MedGMAESlicer.py", testing=False)

    # 3. open the module: import, construct, setup()
    session = open_module(f"{layout}/MedGMAESlicer.py")
    widget, ui = session.widget, session.widget.ui
    report["module_file"] = session.module.__file__
    report["unsupported"] = session.module.UNSUPPORTED
    report["dependency_message"] = ui.dependencyStatusLabel.text
    report["dependency_message_visible"] = ui.dependencyStatusLabel.visible
    report["install_panel_expanded"] = not ui.installCollapsibleButton.collapsed
    report["install_status"] = ui.installStatusLabel.text
    report["job_timer_active"] = widget.panel.jobTimer.active
    report["parameter_node"] = widget._parameterNode is not None
    report["checkpoint_field"] = ui.checkpointPathLineEdit.currentPath
    report["window_mode_items"] = ui.windowModeComboBox.items
    report["modules_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                        ("torch", "monai", "numba", "medgmae_core"))

    # 4. first use: a CT is there, the user clicks Preview mask; asked once, the user says Cancel
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(volume, np.full((8, 8, 8), 40.0, dtype=np.float32))
    widget._parameterNode.inputVolume = volume
    report["preview_enabled"] = ui.previewMaskButton.enabled
    import qt
    app.answers.append(qt.QMessageBox.Cancel)
    ui.previewMaskButton.clicked.emit()
    report["dialogs"] = app.dialogs
    report["preview_message"] = ui.maskStatusLabel.text
    import PyTorchUtils
    report["torch_install_calls"] = PyTorchUtils.calls

    # 5. Predict, in testing mode (what CTest on the extension factory does): nothing installed, nothing asked
    app.testing = True
    ui.predictButton.clicked.emit()
    report["predict_message"] = ui.predictStatusLabel.text
    report["predict_started"] = widget.panel.predictPanel.running
    report["dialogs_after_predict"] = len(app.dialogs)

    # 6. the module's self-test as CTest runs it, in testing mode
    test = session.module.MedGMAESlicerTest()
    test.runTest()
    report["self_test_messages"] = test.messages

    # 7. closing the scene and the module
    scene.Clear(0)
    widget.cleanup()
    report["job_timer_after_cleanup"] = widget.panel.jobTimer.active
    report["modules_imported_at_end"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                               ("torch", "monai", "numba", "medgmae_core"))
    return report


if __name__ == "__main__":
    try:
        result = main(*sys.argv[1:5])
    except BaseException:  # noqa: BLE001 - the test shows the traceback
        traceback.print_exc()
        sys.exit(1)
    print("REPORT " + json.dumps(result, default=str))
