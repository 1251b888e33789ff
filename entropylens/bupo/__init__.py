"""BuPO (Bottom-up Policy Optimization, arXiv 2512.19673): GRPO that first trains an internal layer policy."""

from entropylens.bupo.evaluate import EvalConfig, evaluate, pass_at_k
from entropylens.data.rewards import exact_match_reward, extract_answer, extract_boxed, normalize_answer
from entropylens.bupo.checkpoint import save_checkpoint
from entropylens.bupo.trainer import BupoConfig, train
from entropylens.analysis.stages import pick_boundary_layer

__all__ = [
    "BupoConfig", "EvalConfig", "evaluate", "exact_match_reward", "extract_answer", "extract_boxed",
    "normalize_answer", "pass_at_k", "pick_boundary_layer", "save_checkpoint", "train",
]
