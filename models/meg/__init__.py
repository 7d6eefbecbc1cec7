"""MEG encoders."""

from .brain_module import MegBrainModule, SpatialAttention, SubjectLayer

__all__ = ["MegBrainModule", "SpatialAttention", "SubjectLayer"]
