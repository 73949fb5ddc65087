#!/usr/bin/env bash
# The long-scale runs of `balance` and `mtp` (issue: aux-loss-free balancing and MTP at ten times the tokens),
# in the order that answers the headline first: aux-free (gamma 0.001) against the sequence-wise aux loss on
# seed 0, then seed 1, then the remaining arms. Every call skips runs already collected and resumes an
# interrupted one from its last checkpoint, so after any interruption run the same line again:
#
#     experiments/run_long.sh COMMIT     # the library as committed at COMMIT (keep it the same across sessions)
#
# 75 minutes to 2 hours per run on 2 CPU cores, by CPU model; 10 runs. Checkpoints stay in runs/ (not in git),
# so resuming needs the same checkout. Progress: runs/experiments/*/long/*/seed*/train.log.
set -euo pipefail
code="${1:?usage: experiments/run_long.sh COMMIT (the git commit whose dsv3_jax trains every run)}"
py="${PYTHON:-.venv/bin/python}"
run() { "$py" -m experiments.run "$@" --scale long --code "$code"; }
run baseline --seed 0
run balance --variant aux_loss_seq --seed 0
run baseline --seed 1
run balance --variant aux_loss_seq --seed 1
run mtp --variant no_mtp --seed 0
run mtp --variant no_mtp --seed 1
run balance --variant aux_free_g0.01 --variant aux_loss_batch --variant none
run balance --variant aux_free_g0.0001
run balance   # redraws the summary and plots from every collected arm
run mtp
