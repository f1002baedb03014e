"""The token-id layout of every armlab tokenizer (nanochat's): the 256 byte tokens, then the
learned merges, then the special tokens. Kept apart from `armlab.tokenizer` so the spec can
state the smallest valid vocabulary without importing the tokenizer."""

BYTE_TOKENS = 256  # byte-level BPE: every byte is a token before any merge

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; it delimits documents in packed rows
    # the rest are only used by chat finetuning; kept so the vocabulary matches nanochat's layout
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
BOS = "<|bos|>"

MIN_VOCAB_SIZE = BYTE_TOKENS + len(SPECIAL_TOKENS)  # no merges at all
