#!/bin/bash
# The tables of transfer-results.md, "q_B started fresh under the transferred prior": transfer with
# q_B started fresh (figs/fresh-q-b/fresh-*) against the same units of the published runs, on the
# same q_A (checked): transfer started at q_A, scratch and EWC. Run from the repository root.
set -euo pipefail
F=figs/fresh-q-b
MH="figs/ps03 figs/ps03-s34"
SH="figs/ps03-shared figs/ps03-shared-s34"
python benchmarks/b_recipes.py --first $MH $SH figs/precondition/base-mh-s58 figs/precondition/base-mh-s9 figs/precondition/base-shared-s59 \
    --second $F/fresh-* > $F/from-q_a.md
for method in scratch ewc; do
    python benchmarks/b_recipes.py --methods $method transfer --first $MH $SH figs/ps03-s59 figs/ps03-s59-f0.01 figs/ps03-s9-f0.01 figs/ps03-shared-s59 \
        --second $F/fresh-* > $F/$method.md
done
