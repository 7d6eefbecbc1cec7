"""neurorecon.models."""
