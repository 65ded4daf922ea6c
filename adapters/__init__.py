"""Adapter formats, store and registry. Imports `kernels` first: it sets OpenMP's wait policy before torch loads."""

import kernels as _kernels  # noqa: F401  (before anything imports torch; a bare name would shadow submodules)
