"""neurorecon.pipelines.embed."""
