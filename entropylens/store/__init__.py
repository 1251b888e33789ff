"""Run folders on disk (docs/storage.md): the schemas, the atomic run folder, the trace-run writer, the readers.

The names below are the store's public face; the modules hold the rest.
"""

from entropylens.store.folder import (RUN_ID_RE, RunFolder, new_run_id, read_manifest, resolve_run, write_atomic,
                                      write_json, write_parquet, write_text)
from entropylens.store.read import (layer_table, list_runs, load_entropy, load_outcomes, load_summary, load_tokens,
                                    load_topk, summary_layer_table)
from entropylens.store.schema import (ENTROPY_SCHEMA, LENSES, OUTCOMES_SCHEMA, QUANTITIES, SITES, SUMMARY_ROLES,
                                      SUMMARY_SCHEMA, TOKEN_ROLES, TOKENS_SCHEMA, TOPK_SCHEMA, compute_summary,
                                      model_name, outcome_sets, outcomes_table, summary_by_outcome)
from entropylens.store.writer import RunWriter

__all__ = [
    "ENTROPY_SCHEMA", "LENSES", "OUTCOMES_SCHEMA", "QUANTITIES", "RUN_ID_RE", "RunFolder", "RunWriter", "SITES",
    "SUMMARY_ROLES", "SUMMARY_SCHEMA", "TOKENS_SCHEMA", "TOKEN_ROLES", "TOPK_SCHEMA", "compute_summary",
    "layer_table", "list_runs", "load_entropy", "load_outcomes", "load_summary", "load_tokens", "load_topk",
    "model_name", "new_run_id", "outcome_sets", "outcomes_table", "read_manifest", "resolve_run",
    "summary_by_outcome", "summary_layer_table", "write_atomic", "write_json", "write_parquet", "write_text",
]
