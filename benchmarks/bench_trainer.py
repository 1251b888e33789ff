"""One GRPO training step (generation + scoring + update), entropylens vs TRL's GRPOTrainer, in one process.

Both get the same model weights, prompts, batch (B prompts x G generations), completion limit and
settings (temperature 1, no top-k/top-p, no KL, clip 0.2, token-mean loss, lr 1e-6, one update per
batch, dropout off). entropylens runs in its output phase (plain GRPO) so both do the same work; with
`--phase internal` it runs BuPO's internal-phase step instead (pi^k scored and trained, one more no-grad
forward after the update to log how pi^k moved), which must also stay within TRL's step time.
Completion lengths differ between the two (different random streams), so tokens/s is reported too.

TRL is not a dependency: `pip install trl` into the venv to run this.

    .venv/bin/python benchmarks/bench_trainer.py                    # tiny random Llama, seconds
    .venv/bin/python benchmarks/bench_trainer.py --model smollm2    # the embedded SmolLM2-135M
    .venv/bin/python benchmarks/bench_trainer.py --model smollm2 --prompts 8 --G 4 --max-new-tokens 12 --phase internal
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import string
import tempfile
import time
from pathlib import Path

import torch

from entropylens.bupo import BupoConfig, train
from entropylens.data.rewards import exact_match_reward
from entropylens.data.prompts import Prompt, load_prompts, render


def tiny_model_and_tokenizer():
    """Random Llama (4 layers, d=256) with a character tokenizer: needs no files."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>"] + list(string.printable[:95]))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=512, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    return LlamaForCausalLM(cfg).eval(), tok


def bench_entropylens(model, tok, prompts, args, out: Path) -> list[dict]:
    layer = max(1, model.config.num_hidden_layers // 2)  # BuPO's internal phase trains pi^k of the middle layer
    cfg = BupoConfig(internal_layer=layer, internal_steps=args.steps if args.phase == "internal" else 0,
                     steps=args.steps, prompts_per_step=args.prompts,
                     num_generations=args.G, max_new_tokens=args.max_new_tokens,
                     micro_batch_size=args.prompts * args.G)
    train(cfg, model, tok, prompts, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n = args.prompts * args.G  # perf/tokens_per_s = completion tokens / step wall time
    tokens = [r["completion/len_mean"] * n for r in rows]
    return [{"s": t / r["perf/tokens_per_s"], "tokens": t} for t, r in zip(tokens, rows)]


def bench_trl(model, tok, prompts, args, out: Path) -> list[dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.times = 0.0, []

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.times.append(time.perf_counter() - self.t0)

    def reward(prompts, completions, answer, **kw):
        return [exact_match_reward(c, a) for c, a in zip(completions, answer)]

    data = Dataset.from_list([{"prompt": render(p, tok), "answer": p.answer} for p in prompts])
    cfg = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.prompts * args.G,
        num_generations=args.G, max_completion_length=args.max_new_tokens, learning_rate=1e-6, beta=0.0,
        epsilon=0.2, temperature=1.0, top_k=0, top_p=1.0, loss_type="dapo", num_iterations=1,
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=1,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, bf16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    n = args.prompts * args.G
    return [{"s": t, "tokens": h["completions/mean_length"] * n} for t, h in zip(timer.times, logs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random Llama) or what entropylens.model.load loads")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (B)")
    ap.add_argument("--G", type=int, default=4, help="generations per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="steps per trainer; the first is warm-up")
    ap.add_argument("--phase", choices=("output", "internal"), default="output",
                    help="entropylens' phase: output (plain GRPO, TRL's work) or internal (BuPO's pi^k steps, which "
                         "also score pi^k and re-score the batch after the update)")
    args = ap.parse_args()
    if args.model == "tiny":
        model, tok = tiny_model_and_tokenizer()
        prompts = [Prompt(text=f"{a}+{b}=", messages=None, answer=str(a + b), source="bench")
                   for a in range(5) for b in range(5)]
    else:
        from entropylens.model.load import load_model

        lm = load_model(args.model)
        model, tok = lm.model, lm.tokenizer
        prompts = load_prompts("digits", limit=64, split="train")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        results["entropylens"] = bench_entropylens(copy.deepcopy(model), tok, prompts, args, Path(d) / "el")
        print("entropylens steps:", results["entropylens"], flush=True)
        try:
            # loaders freeze parameters for tracing; TRL refuses a model with none trainable
            trl_model = copy.deepcopy(model).train().requires_grad_(True)
            if getattr(trl_model, "hf_quantizer", None) is not None:  # GGUF-derived: weights are dequantised
                trl_model.hf_quantizer.remove_quantization_config(trl_model)
            results["trl"] = bench_trl(trl_model, tok, prompts, args, Path(d) / "trl")
        except ImportError as e:
            print(f"TRL not available ({e}); pip install trl to compare")
    print(f"\nmodel={args.model} B={args.prompts} G={args.G} max_new_tokens={args.max_new_tokens} phase={args.phase} "
          f"threads={torch.get_num_threads()} (median over steps after the first)")
    summary = {}
    for name, steps in results.items():
        rest = steps[1:] or steps
        s, tokens = statistics.median(r["s"] for r in rest), statistics.median(r["tokens"] for r in rest)
        summary[name] = (s, tokens / s)
        print(f"{name:12s} step {s:7.3f} s   completion tokens/step {tokens:7.1f}   {tokens / s:8.1f} tok/s")
    if len(summary) == 2:
        (a, ta), (b, tb) = summary["entropylens"], summary["trl"]
        print(f"ratio entropylens/trl: step time {a / b:.2f}x, tokens/s {ta / tb:.2f}x")


if __name__ == "__main__":
    main()
