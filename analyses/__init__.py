"""Scripts that turn cached runs into figures and reports; run each from the repository root as
`python -m analyses.NAME`."""
