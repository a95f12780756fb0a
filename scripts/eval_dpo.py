"""Score a Diffusion-DPO tuned model against its base with a reward model (``fdistill.benchmarks.dpo_eval``).

    python scripts/eval_dpo.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --tuned outputs/run/model \
        --prompts partiprompts.parquet --num-prompts 200 --scorer pickscore --seeds 4 --out dpo_eval
"""
from fdistill.benchmarks.dpo_eval import main

if __name__ == "__main__":
    main()
