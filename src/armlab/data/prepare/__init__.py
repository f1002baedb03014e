"""`armlab prepare`: pool -> eval holdout -> tokenizer sample -> every arm's shuffled shards.

The pipeline, for all targets (eval set, tokenizer sample, each pool arm) at once, one module a
pass:

1. `keys`: per pool file (parallel), read only the id column (else the text), the score columns
   and the token counts the arms need; save keys/scores/weights to a small .npz.
2. `thresholds`: in the parent, bounded memory: the eval cut, the tokenizer fraction, each
   `top` / `sample` arm's exact global threshold and each cap, by radix select.
3. `routing`: per pool file (parallel, each file read once for every target): membership is a
   pure function of the .npz arrays and the thresholds; each target's rows go to a stage-1 file
   sorted by the shuffle hash. A unit is done when its marker is written; a rerun skips it.
4. `writing`: per target (parallel), stream the rows in hash order into shards in a partial
   dir, which is swapped into place with its manifest.

`targets` says what is built and makes every data fingerprint; `prebuilt` prepares arms whose
files are the selection; `executor` is where units of work run (`Executor.map`); `run` strings
the passes together.
"""

from armlab.data.prepare.options import PrepareOptions
from armlab.data.prepare.run import prepare
from armlab.data.prepare.targets import EVAL, TOKENIZER, arm_selection

__all__ = ["EVAL", "TOKENIZER", "PrepareOptions", "arm_selection", "prepare"]
