"""neurorecon.pipelines."""
