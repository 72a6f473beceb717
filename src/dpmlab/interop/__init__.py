"""Interoperability with other diffusion libraries (imported lazily; optional dependencies)."""
