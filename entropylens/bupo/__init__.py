"""BuPO (Bottom-up Policy Optimization, arXiv 2512.19673): GRPO that first trains an internal layer policy.

The names below are imported on first use, so `entropylens.bupo.config` stays light."""

from entropylens._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "entropylens.bupo.config": "BupoConfig BupoRunConfig",
    "entropylens.bupo.evaluate": "EvalConfig evaluate pass_at_k",
    "entropylens.model.checkpoint": "save_checkpoint",
    "entropylens.bupo.trainer": "train",
    "entropylens.data.rewards": "exact_match_reward extract_answer extract_boxed normalize_answer",
    "entropylens.analysis.stages": "pick_boundary_layer",
})
