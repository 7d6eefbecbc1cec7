"""neurorecon.models.common: the shared base (errors, checks, logging) every layer may import."""
