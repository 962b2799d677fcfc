"""Which 3D Slicer the module supports, said once and clearly; and the translation function.

The module file imports this before anything else, so this file uses nothing newer than Python 3.9 (Slicer 5.8's
Python): an older Slicer gets one sentence, not a traceback.

MedGMAE needs Python >= 3.10 (``medgmae_core`` uses ``dataclasses.field(kw_only=True)`` and states
``requires-python = ">=3.10"``). Slicer 5.6 and 5.8 ship Python 3.9; Slicer 5.10 and newer ship Python 3.12.
So the minimum is **3D Slicer 5.10**.
"""
import sys

MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 10)
SLICER_PYTHON = "3.12"  # the Python of Slicer 5.10 and 5.12 (Slicer's top-level CMakeLists: Slicer_REQUIRED_PYTHON_VERSION)


def translator():
    """Slicer's ``slicer.i18n.tr`` (it finds the translation context from the calling file), else identity.

    Use as ``_ = translator()`` at module level, so ``_("...")`` is called from the module that owns the text.
    """
    if "slicer" not in sys.modules:  # plain Python (e.g. the prediction worker): no application, nothing to import
        return lambda text: text
    try:
        from slicer.i18n import tr  # lazy: only the application has slicer.i18n
        return tr
    except ImportError:  # plain Python with slicer-core, which has no slicer.i18n
        return lambda text: text


def translate(context, text):
    """``slicer.i18n.translate(context, text)`` (an explicit context, e.g. Slicer's module categories), else text."""
    if "slicer" not in sys.modules:
        return text
    try:
        from slicer.i18n import translate as slicer_translate  # lazy: only the application has slicer.i18n
    except ImportError:
        return text
    return slicer_translate(context, text)


def slicer_version(app=None):
    """``(major, minor)`` of the running Slicer application (``qSlicerCoreApplication.majorVersion/minorVersion``),
    or None outside the application."""
    if app is None:
        slicer = sys.modules.get("slicer")
        app = getattr(slicer, "app", None) if slicer is not None else None
    try:
        return int(app.majorVersion), int(app.minorVersion)
    except (AttributeError, TypeError, ValueError):
        return None


def unsupported_reason(python=None, slicer=None):
    """One message for a Slicer (or Python) that is too old, else None.

    ``python`` defaults to this interpreter's ``(major, minor)``; ``slicer`` to :func:`slicer_version`.
    """
    python = tuple(python or sys.version_info[:2])
    slicer = slicer if slicer is not None else slicer_version()
    too_old_python = python < MIN_PYTHON
    too_old_slicer = slicer is not None and tuple(slicer) < MIN_SLICER
    if not (too_old_python or too_old_slicer):
        return None
    this = "this is 3D Slicer {}.{} with Python {}.{}".format(slicer[0], slicer[1], python[0], python[1]) \
        if slicer is not None else "this is Python {}.{}".format(python[0], python[1])
    return ("MedGMAE needs 3D Slicer {}.{} or newer (Python {}); {}. Please install a current 3D Slicer "
            "from https://download.slicer.org and add the MedGMAE extension there.".format(
                MIN_SLICER[0], MIN_SLICER[1], SLICER_PYTHON, this))
