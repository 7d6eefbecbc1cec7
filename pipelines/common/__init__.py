"""neurorecon.pipelines.common."""
