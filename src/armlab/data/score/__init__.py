"""`armlab score`: selection methods that are models (fastText, Hugging Face classifiers, heads
over an embedding column), run over every pool document once, their scores kept beside the pool.

- `backends`: the seam, one module per kind of scorer (fasttext, hf, head);
- `models`: where a model comes from (a path, a URL, the hub) and its content hash;
- `units`: one unit of work (a pool file or a row-group range) and what a worker runs for it;
- `run`: the units through an executor, resumably, with progress, into the scorer's dir;
- `sidecar`: the scores' layout on disk (a keyed sidecar file per pool file) and manifest;
- `fresh`: whether the scores can be used (prepare's check), naming what is stale;
- `probe`: docs/s of a scorer on this host, for `armlab plan`.

Arms select on the scores with `score = "<scorer>"`: prepare's key pass joins each pool file's
sidecar to the keys it reads (positionally, checked by key), and `top` / `sample` rank by it
exactly as they rank by a score column. (Nothing is imported here: prepare's key pass imports
`sidecar` and `fresh` without the model libraries.)
"""
