"""Models: loading (embedded, GGUF, folder, hub), the site layout of a decoder, tracing backends, NDIF."""
