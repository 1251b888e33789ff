"""Run folders on disk (docs/storage.md): the stored vocabulary and schemas, the atomic run folder, the trace-run
writer, the readers and the cache layout. The names below are the store's public face, imported on first use."""

from entropylens._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "entropylens.store.vocab": "LENSES QUANTITIES SITES SUMMARY_ROLES TOKEN_ROLES",
    "entropylens.store.schema": "ENTROPY_SCHEMA OUTCOMES_SCHEMA SUMMARY_SCHEMA TOKENS_SCHEMA TOPK_SCHEMA "
                                "compute_summary model_name outcome_sets outcomes_table summary_by_outcome",
    "entropylens.store.folder": "RUN_ID_RE RunFolder new_run_id read_manifest resolve_run write_atomic write_json "
                                "write_parquet write_text",
    "entropylens.store.read": "entropy_groups layer_table list_runs load_entropy load_entropy_group load_outcomes "
                              "load_summary load_tokens load_topk summary_layer_table",
    "entropylens.store.writer": "RunWriter",
})
