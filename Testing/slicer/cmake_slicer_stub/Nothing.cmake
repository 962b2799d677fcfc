# Extension config generation and packaging are not part of what this stand-in checks.
