"""neurorecon.models.vision."""
