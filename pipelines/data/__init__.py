"""neurorecon.pipelines.data."""
