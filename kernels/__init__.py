"""loraserve's kernels. Importing the package sets how OpenMP's idle threads wait, before torch loads it.

torch's OpenMP runtime (libgomp, which the C decode kernels share: one runtime in the process) cuts the time an
idle worker spins before it sleeps from ~3 ms to ~100 spins once more threads have joined OpenMP teams than
there are CPUs. Any other thread that ever ran a parallel torch op (an adapter load, a grammar mask, a client
thread) keeps a team alive, and from then on every parallel region of the engine wakes sleeping workers: decode
steps of 64 requests took 1.6x as long (measured with a thread that had run one 512x512 matmul). ACTIVE with the
default spin count keeps the ~3 ms spin (then sleep, so an idle server does not burn its cores) and makes the
throttled spin 1,000. libgomp reads these once, when it loads, so this must run before `import torch`; what the
environment already says wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
