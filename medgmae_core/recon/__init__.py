"""3DGR-CT reconstruction: projection data (``projection_data``), its file format (``projection_file``), APS Data
Exchange scans (``data_exchange``), simulated scans (``simulation``), initialisations (random, FBP heuristic,
zero-shot MedGMAE), the Gaussian fitting loop and metrics. The ``medgmae reconstruct`` command over them is
``commands/reconstruct.py``.

Submodules are imported on use (``from medgmae_core.recon.fit import ReconstructionFit``) so importing the
package stays cheap.
"""
