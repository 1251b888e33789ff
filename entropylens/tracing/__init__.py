"""`entropylens trace`: the config, the job (generate, capture, decode, write), one batch, sharding."""
