"""neurorecon.configs."""
