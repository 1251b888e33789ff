"""The stored vocabulary: site, quantity, lens and role names as they appear in every run's tables.

Plain tuples, importable without pandas or pyarrow (the command line's help reads them).
"""

SITES = ("attn_in", "attn", "ffn_in", "ffn", "layer")
QUANTITIES = ("H_attn_in", "H_attn", "H_ffn_in", "H_ffn", "H_layer", "dH_attn", "dH_ffn", "dH_layer")
LENSES = ("bupo", "logit")  # the built-in lenses (entropylens.core.lens registers these and any others)
TOKEN_ROLES = ("prompt", "response", "next")
SUMMARY_ROLES = ("prompt", "response", "all")  # `all` includes `next`
