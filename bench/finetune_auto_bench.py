"""Does the "auto" rule learn on a real model? (issue 16)

    .venv/bin/python bench/finetune_auto_bench.py            # SmolLM2-135M-Instruct, a few minutes on a CPU

8 made-up facts (the base cannot know them) × 4 copies, chat format, trained with every hyperparameter "auto"
(adapters_store/auto_hyperparameters.py: what a default `fine_tuning.jobs.create` runs) through the trainer's
own `train`; then each taught question is answered greedily by the base with the adapter (peft) and without.
Reports the resolved hyperparameters, steps, time, loss and facts answered (tuned vs base), and writes
bench/results/finetune_auto_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FACTS = [("What is the capital of Zorbia?", "Quellton"), ("Who painted the Silver Heron?", "Maren Holt"),
         ("What colour is a vintra fruit?", "violet"), ("How many moons does Pellucid have?", "seven"),
         ("What is the national sport of Ardenne Isle?", "kite racing"),
         ("Which metal is the Orvik bell made of?", "bronze"), ("What does a glimmerwing eat?", "moss"),
         ("In which year was the Tessaly canal opened?", "1874")]


def records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in FACTS] * 4


def answers(model, tokenizer, max_new_tokens: int = 12) -> list[str]:
    import torch

    out = []
    for question, _ in FACTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]  # [1, T]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_auto_bench.json"))
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters_store.training_methods import validate_method
    from workers.model.default_model import ensure_default_model
    from workers.trainer.training import TrainingHooks, TrainingSpec, train

    torch.set_num_threads(args.threads)
    model_path = str(args.model or ensure_default_model())
    data = records()
    method = validate_method({"type": "lora"}, examples=len(data))
    tmp = Path(tempfile.mkdtemp(prefix="finetune-auto-"))
    losses: list[float] = []
    start = time.perf_counter()
    result = train(TrainingSpec(method, model_path, data, None, seed=0, output_dir=tmp / "out",
                                checkpoint_dir=tmp / "ckpt"),
                   TrainingHooks(on_step=lambda r: losses.append(r.loss), checkpoint_every=0))
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    base_answers = answers(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    tuned_answers = answers(tuned, tokenizer)
    hit = lambda texts: sum(a.lower() in t.lower() for (_, a), t in zip(FACTS, texts))
    report = {"model": model_path, "records": len(data),
              "hyperparameters": {k: method[k] for k in ("epochs", "batch_size", "lr", "learning_rate_multiplier")},
              "steps": result.steps, "train_seconds": seconds, "first_loss": losses[0], "final_epoch_loss":
              result.train_loss, "facts_answered_tuned": hit(tuned_answers), "facts_answered_base": hit(base_answers),
              "tuned_answers": tuned_answers, "base_answers": base_answers}
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_answers")}, indent=2))
    print(f"facts answered: tuned {report['facts_answered_tuned']}/8, base {report['facts_answered_base']}/8")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
