"""Command-line layers (argparse, files, progress) over the pure library; one module per ``medgmae`` command."""
