"""The PyTorch side of `train_throughput.py --vs-hf`: HF transformers' `DeepseekV3ForCausalLM` trained with AdamW
on the same config, batch and sequence length, on this machine's CPU.

Needs torch and transformers, which are not project requirements; in their own environment:

    python3 -m venv .venv-hf && .venv-hf/bin/pip install -r requirements-hf.txt
    .venv/bin/python benchmarks/train_throughput.py --write-hf-config /tmp/small_hf.json   # our small preset, MTP off
    .venv-hf/bin/python benchmarks/hf_train_throughput.py --config /tmp/small_hf.json --batch 8 --seq 256

Measures, each after --warmup steps: the median time of a full training step (forward, cross-entropy loss,
backward, AdamW with the trainer's betas and weight decay, zero_grad) over --steps steps on random tokens, and
torch's fp32 matmul peak on this CPU (the best of a few square GEMM sizes), and prints one JSON object. MTP is
not part of HF's training forward, so the config should have num_nextn_predict_layers 0 on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="an HF config.json (our hf_config.to_hf(cfg))")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError as err:
        sys.exit(f"needs torch and transformers (not project requirements): {err}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        hf = json.load(f)
    config = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures",
                                                                                       "torch_dtype")})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq + 1)) for _ in range(4)]

    def step(i: int) -> float:
        window = batches[i % 4]
        out = model(input_ids=window[:, :-1], labels=window[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    # HF shifts labels inside the loss when given `labels`; passing the already-shifted targets keeps the
    # FLOPs identical (one position fewer is predicted, as on our side with the window's last token).
    for i in range(args.warmup):
        step(i)
    durations = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        durations.append(time.perf_counter() - t0)
    step_s = statistics.median(durations)

    peak = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(3, int(2e10 / (2 * n ** 3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        peak = max(peak, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    print(json.dumps({
        "framework": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "threads": torch.get_num_threads(), "parameters": n_params, "batch": args.batch, "seq": args.seq,
        "tokens_per_s": round(args.batch * args.seq / step_s, 1), "step_ms": round(1e3 * step_s, 2),
        "step_ms_mean": round(1e3 * statistics.mean(durations), 2), "steps": args.steps,
        "matmul_peak_gflops": round(peak / 1e9, 1)}, indent=2))


if __name__ == "__main__":
    main()
