"""fewstep: distil many-step Diffusers teachers into 1-4 step students."""

__version__ = "0.1.0"
