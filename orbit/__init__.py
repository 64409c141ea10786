"""orbit: the command line and the few dependency-free helpers every stage shares.

Importing this package must stay cheap (no torch): `orbit --help` and `orbit serve` rely on it.
"""

__version__ = "0.1.0"
