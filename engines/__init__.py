"""Deployment artifacts: model and profile tables, the build manifest, engines per profile, the Triton model repository."""
