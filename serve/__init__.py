"""neurorecon.serve."""
