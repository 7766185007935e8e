"""dclip-ray: DiffusionCLIP as a distributed, resumable batch system.

The core package (math, models, losses, fine-tuning, IO) never imports Ray; all Ray code
lives in :mod:`dclip_ray.pipeline`.
"""

__version__ = "0.1.0"
