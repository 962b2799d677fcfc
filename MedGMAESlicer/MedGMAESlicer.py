"""MedGMAESlicer: Gaussian masked autoencoders for CT in 3D Slicer (wiring only; the logic is MedGMAESlicerLib)."""
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedGMAESlicerLib import resource_path
from MedGMAESlicerLib.install import InstallLogic
from MedGMAESlicerLib.jobpanel import JobPanel
from MedGMAESlicerLib.logic import MedGMAELogic
from MedGMAESlicerLib.parameters import parameter_node_wrapper_class, parameters_from_wrapper


class MedGMAESlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedGMAE"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["MedGMAE-Slicer developers"]
        self.parent.helpText = (
            "Mask a CT, predict 3D Gaussians with a MedGMAE checkpoint and inspect them as ellipsoid glyphs, "
            "pre-train or fine-tune in the background, and reconstruct CT from projections with a zero-shot "
            "Gaussian initialisation. The bundled weights are small demo weights, not the paper's.")
        self.parent.acknowledgementText = "MedGMAE (ICLR 2026): Gaussian masked autoencoders for 3D CT."
        self.parent.icon = qt.QIcon(resource_path("Icons/MedGMAESlicer.png"))


class MedGMAESlicerLogic(ScriptedLoadableModuleLogic, MedGMAELogic):
    """Slicer's module logic over the plain-Python MedGMAELogic (everything is in MedGMAESlicerLib)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        MedGMAELogic.__init__(self)

    def getParameterNode(self):
        return parameter_node_wrapper_class()(super().getParameterNode())


class MedGMAESlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode = None
        self._guiTag = None
        self._predicting = self._cancelPredict = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/MedGMAESlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedGMAESlicerLogic()
        self.installLogic = InstallLogic(log=self.ui.installStatusLabel.setText)

        self.ui.previewMaskButton.clicked.connect(lambda: self._run(self.ui.maskStatusLabel, self.logic.preview_mask_from_parameters))
        self.ui.predictButton.clicked.connect(self.onPredict)
        self.ui.exportPlyButton.clicked.connect(lambda: self._run(self.ui.predictStatusLabel, self.logic.export_ply_from_parameters))
        self.ui.exportNiftiButton.clicked.connect(lambda: self._run(self.ui.predictStatusLabel, self.logic.export_nifti_from_parameters))
        self.ui.windowPointSelector.currentNodeChanged.connect(self.ui.windowPointPlaceWidget.setCurrentNode)
        self.ui.checkDependenciesButton.clicked.connect(lambda: self.ui.installStatusLabel.setText(self.installLogic.check().text()))
        self.ui.installDependenciesButton.clicked.connect(
            lambda: self._run(self.ui.installStatusLabel, lambda p, **kw: self.installLogic.install(ask_confirmation=True).text()))

        self.trainPanel = JobPanel(self.ui.trainButton, self.ui.trainProgressBar, self.ui.trainStatusLabel,
                                   lambda: self.logic.start_training_from_parameters(self._parameters()),
                                   idle_text=self.ui.trainButton.text)
        self.reconPanel = JobPanel(self.ui.reconButton, self.ui.reconProgressBar, self.ui.reconStatusLabel,
                                   lambda: self.logic.start_reconstruction_from_parameters(self._parameters()),
                                   idle_text=self.ui.reconButton.text,
                                   on_finished=lambda result: self.logic.load_reconstruction_result(result))
        self.ui.trainButton.clicked.connect(self.trainPanel.toggle)
        self.ui.reconButton.clicked.connect(self.reconPanel.toggle)
        self.jobTimer = qt.QTimer()
        self.jobTimer.setInterval(250)
        self.jobTimer.timeout.connect(self.trainPanel.poll)
        self.jobTimer.timeout.connect(self.reconPanel.poll)
        self.jobTimer.start()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self.initializeParameterNode())
        self.initializeParameterNode()

    def cleanup(self):
        self.jobTimer.stop()
        for panel in (self.trainPanel, self.reconPanel):
            panel.cancel()
        self.removeObservers()

    def onSceneStartClose(self, caller=None, event=None):
        self.setParameterNode(None)
        self.logic.reset()

    def enter(self):
        self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
            self._onParametersModified()

    def _parameters(self):
        return parameters_from_wrapper(self._parameterNode)

    def _onParametersModified(self, caller=None, event=None):
        params = self._parameters()
        ready = params.inputVolume is not None
        self.ui.previewMaskButton.enabled = ready
        self.ui.predictButton.enabled = ready
        hasPrediction = self.logic.last_prediction is not None
        self.ui.exportPlyButton.enabled = self.ui.exportNiftiButton.enabled = hasPrediction
        if hasPrediction:
            self.logic.update_display_from_parameters(params)

    def onPredict(self):
        """Predict runs in the GUI thread with events processed between windows; the button cancels it meanwhile."""
        if self._predicting:
            self._cancelPredict = True
            return
        self._predicting, self._cancelPredict = True, False
        self.ui.predictButton.text = "Cancel"
        try:
            self._run(self.ui.predictStatusLabel, self.logic.predict_from_parameters, progress=self._predictProgress)
        finally:
            self._predicting = False
            self.ui.predictButton.text = "Predict"
            self.ui.predictProgressBar.visible = False

    def _predictProgress(self, fraction, text=""):
        self.ui.predictProgressBar.visible = fraction < 1.0
        self.ui.predictProgressBar.value = int(100 * fraction)
        self.ui.predictStatusLabel.text = text
        slicer.app.processEvents()
        return self._cancelPredict

    def _run(self, statusLabel, action, **kwargs):
        with slicer.util.tryWithErrorDisplay("MedGMAE failed.", waitCursor=True):
            result = action(self._parameters(), interactive=True, **kwargs)
            statusLabel.text = result if isinstance(result, str) else self.logic.last_message
        self._onParametersModified()


class MedGMAESlicerTest(ScriptedLoadableModuleTest):
    """Runs the library's self-tests on the application's scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        from MedGMAESlicerLib.selftest import run_self_tests
        run_self_tests(slicer.mrmlScene, report=self.delayDisplay)
        self.delayDisplay("MedGMAESlicer self-tests passed")
