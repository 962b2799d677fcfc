"""3DGR-CT reconstruction: projection data I/O, initialisations (random, FBP heuristic, zero-shot MedGMAE),
the Gaussian fitting loop, metrics, and the ``medgmae reconstruct`` command.

Submodules are imported on use (``from medgmae_core.recon.fit import ReconstructionFit``) so importing the
package stays cheap.
"""
