"""Scripts that turn cached runs into figures and reports; run each as `python -m analyses.NAME` from the repository root."""
