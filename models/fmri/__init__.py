"""fMRI encoders."""

from .encoder import FmriEncoder

__all__ = ["FmriEncoder"]
