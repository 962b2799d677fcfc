"""Exports: PLY (``ply``), NIfTI (``nifti``), ellipsoid glyphs (``glyphs``, VTK), Slicer scenes (``slicer_scene``,
slicer-core) and PNG overviews (``figures``).

Only this package may import VTK or slicer-core, and only lazily inside the functions that need them, so
``import medgmae_core.export`` (and ``export.ply`` / ``export.nifti``) works without them.
"""
