"""The exact decode engine: lenses, the streaming log-sum-exp and its kernels. Torch only, no IO."""
