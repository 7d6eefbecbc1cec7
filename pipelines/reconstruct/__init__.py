"""Reconstruction stage: decoded embeddings -> images (and the generator the project trains)."""
