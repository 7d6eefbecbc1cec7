"""neurorecon.pipelines.preprocess."""
