"""Dashboard views; each module offers build_* functions (figure + data), layout() and register()."""
