"""blockskip: memory-efficient personalization of Diffusion Transformers on edge boards.

Implements DiT-BlockSkip (CVPR 2026): timestep-aware dynamic patch sampling, block selection by
cross-attention masking, and block skipping with residual features precomputed on a host.
"""

__version__ = "0.1.0"
