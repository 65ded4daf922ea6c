"""The loraserve service. Imports `kernels` first: it sets OpenMP's wait policy before torch loads (see there)."""

import kernels as _kernels  # noqa: F401  (before anything imports torch; a bare name would shadow submodules)
