"""neurorecon.pipelines.sample."""
