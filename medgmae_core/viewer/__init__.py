"""``medgmae view``: a browser viewer for CTs and their Gaussians (for people without 3D Slicer).

``session`` (loading, prediction, thresholds, picking, slices, export) and ``scene3d`` (the VTK 3D view) hold the
logic and import no web code; ``app`` lays out the page with ``trame`` / ``trame-vtk`` (the optional ``[viewer]``
extra) and is the only module here that imports them.
"""
