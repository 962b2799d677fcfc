"""Stand-in for the PyTorch extension's ``PyTorchUtils`` module (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py),
on ``sys.path`` only in tests that want the extension present. Same names and signatures as the real
``PyTorchUtilsLogic``: ``torchInstalled()`` reads torch's package metadata, ``installTorch(askConfirmation,
forceComputationBackend, torchVersionRequirement, torchvisionVersionRequirement)`` returns the ``torch`` module, or
None when the installation was declined or failed. Here it installs nothing: it records the call and returns
``INSTALL_RESULT``.
"""
import importlib.metadata

calls = []
INSTALL_RESULT = None


class PyTorchUtilsLogic:
    @staticmethod
    def torchInstalled():
        try:
            importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
        return INSTALL_RESULT
