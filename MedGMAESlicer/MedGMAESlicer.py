"""MedGMAE: Gaussian masked autoencoders for CT in 3D Slicer (wiring only; the behaviour is in MedGMAESlicerLib)."""
import logging

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import MedGMAESlicerLib
from MedGMAESlicerLib.compat import translate, translator, unsupported_reason

_ = translator()
UNSUPPORTED = unsupported_reason()  # None on Slicer >= 5.10; else one sentence for the user
if UNSUPPORTED is None:  # the library needs Python >= 3.10: an older Slicer imports only compat
    from MedGMAESlicerLib.install import InstallLogic
    from MedGMAESlicerLib.logic import MedGMAELogic
    from MedGMAESlicerLib.panel import MedGMAEPanel
    from MedGMAESlicerLib.parameters import parameter_node_wrapper_class, parameters_from_wrapper
    from MedGMAESlicerLib.selftest import run_self_tests
else:
    MedGMAELogic = object
    logging.warning(UNSUPPORTED)

DOCUMENTATION = "https://github.com/medgmae/MedGMAE-Slicer/blob/main/MedGMAESlicer/README.md"


class MedGMAESlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # also sets the icon from Resources/Icons/MedGMAESlicer.png
        self.parent.title = _("MedGMAE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGMAE-Slicer maintainers (MedGMAE project)"]
        self.parent.helpText = _(
            "Mask a CT, predict 3D Gaussians with a MedGMAE checkpoint and inspect them as ellipsoid glyphs, "
            "pre-train or fine-tune in the background, and reconstruct CT from projections with a zero-shot "
            "Gaussian initialisation. The bundled weights are small demo weights, not the paper's. "
            "See the <a href=\"{url}\">module documentation</a>.").format(url=DOCUMENTATION)
        self.parent.acknowledgementText = _(
            "MedGMAE (ICLR 2026): Gaussian masked autoencoders for 3D CT. PyTorch comes from the PyTorch extension.")


class MedGMAESlicerLogic(ScriptedLoadableModuleLogic, MedGMAELogic):
    """Slicer's module logic: the parameter node (ScriptedLoadableModuleLogic) and the MedGMAELogic facade over its
    prediction, display and background parts (MedGMAESlicerLib). No __init__: ScriptedLoadableModuleLogic.__init__
    calls super().__init__(), which is MedGMAELogic.__init__ (the parts, on slicer.mrmlScene)."""

    def getParameterNode(self):
        return parameter_node_wrapper_class()(super().getParameterNode())


class MedGMAESlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self.panel = None
        self._parameterNode = self._parameterNodeGuiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED is not None:  # an older Slicer: one clear message instead of a panel that cannot work
            label = qt.QLabel(UNSUPPORTED)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedGMAESlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedGMAESlicerLogic()
        self.panel = MedGMAEPanel(self.ui, self.logic, parameters=self._parameters, timer_factory=qt.QTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
        self.removeObservers()

    def enter(self):
        if self.panel is not None:
            self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller=None, event=None):
        self.setParameterNode(None)
        self.panel.on_scene_start_close()

    def onSceneEndClose(self, caller=None, event=None):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        """Developer "Reload": re-import MedGMAESlicerLib too, then the module file."""
        if self.panel is not None:
            self.panel.cleanup()
        MedGMAESlicerLib.reload_submodules()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        self.panel.normalize_parameters(self._parameterNode)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
            self._onParametersModified()

    def _parameters(self):
        return parameters_from_wrapper(self._parameterNode) if self._parameterNode else None

    def _onParametersModified(self, caller=None, event=None):
        self.panel.on_parameters_modified()


class MedGMAESlicerTest(ScriptedLoadableModuleTest):
    """The library's self-tests on the application's scene; without the dependencies (testing mode installs
    nothing, as on the extension build machines) only those that need neither torch nor medgmae_core run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        if UNSUPPORTED is not None:
            self.delayDisplay(UNSUPPORTED)
            return
        report = InstallLogic().check()
        if not report.ok:
            self.delayDisplay(report.summary() + " " + _("Running only the self-tests that need no dependencies."))
        run_self_tests(slicer.mrmlScene, report=self.delayDisplay, with_dependencies=report.ok)
        self.delayDisplay(_("MedGMAE self-tests passed"))
