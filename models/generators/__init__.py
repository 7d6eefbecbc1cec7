"""Image generators: brain-decoded embeddings -> images (diffusers pipelines and our own)."""
