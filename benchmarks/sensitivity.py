"""How much do single figures move with the calibration draw and with tie-breaking? (Run by hand.)

Wanda 2:4 and 50 % perplexity for calibration seeds 0 to N-1 (mean and standard deviation), and
magnitude 2:4 under three tie-breaking rules: the embedded model is dequantized from Q4_1 (16 levels per
block of 32 weights), so |W| has many exact ties and N:M magnitude pruning must break them somehow.

    python benchmarks/sensitivity.py --seeds 8
"""

from __future__ import annotations

import argparse
import statistics

import torch

import llmprune
import llmprune.methods.magnitude as magnitude
from llmprune.methods.patterns import n_m_mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8, help="calibration seeds 0..N-1 for Wanda")
    args = parser.parse_args()
    model, tokenizer = llmprune.load("smollm2", "float32", "cpu"), llmprune.load_tokenizer()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    evaluation = llmprune.evaluation_data(tokenizer, "embedded", 512, 16)

    def perplexity_after(method: str, seed: int = 0, pattern: str = "2:4") -> float:
        model.load_state_dict(dense)
        calibration = llmprune.calibration_data(tokenizer, "embedded", 32, 256, seed)
        llmprune.prune(model, calibration, method=method, pattern=pattern)
        return llmprune.perplexity(model, evaluation)

    for pattern in ("2:4", "unstructured"):
        values = []
        for seed in range(args.seeds):
            values.append(perplexity_after("wanda", seed, pattern))
            print(f"wanda {pattern}, calibration seed {seed}: {values[-1]:.2f}", flush=True)
        if len(values) > 1:
            print(
                f"wanda {pattern}: mean {statistics.mean(values):.2f}, sd {statistics.stdev(values):.2f}, "
                f"range {min(values):.2f}-{max(values):.2f}",
                flush=True,
            )

    groups_with_ties = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers" in name:
            w = dense[f"{name}.weight"].abs().reshape(-1, 4)
            ordered = w.sort(dim=1).values
            groups_with_ties += int((ordered[:, 1] == ordered[:, 2]).sum())
    print(f"groups of 4 whose 2nd and 3rd smallest |W| tie (the 2:4 cut is ambiguous): {groups_with_ties}")

    def stable(scores, pattern):  # ties: the earlier position is pruned (the first k of a stable sort)
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        index = torch.sort(groups, dim=2, stable=True).indices[..., : pattern.m - pattern.n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, index, True).reshape(rows, cols)

    def earliest(scores, _sparsity, pattern, per_row=True):
        return stable(scores, pattern)

    def latest(scores, _sparsity, pattern, per_row=True):
        return stable(scores.flip(1), pattern).flip(1)

    def torch_topk(scores, _sparsity, pattern, per_row=True):
        return n_m_mask(scores, pattern.n, pattern.m)

    for label, rule in [
        ("earliest pruned", earliest),
        ("torch.topk order (llmprune)", torch_topk),
        ("latest pruned", latest),
    ]:
        magnitude.select_mask = rule
        print(f"magnitude 2:4, ties: {label}: {perplexity_after('magnitude'):.2f}", flush=True)


if __name__ == "__main__":
    main()
