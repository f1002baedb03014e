"""The built-in trainer IS nanochat 92d63d4's recipe: checked against nanochat itself, imported
from the shared snapshot (tests/reference_util.py), never copied into the project.

- forward: nanochat's GPT with random (not init) weights, copied into armlab's: every block's
  output and the logits agree in fp32 on CPU (depth 2 and 4, sliding windows active);
- init: the same seed gives the same initial weights;
- optimiser: 3 steps from identical weights and gradients, each side with its own default
  hyperparameters and schedules for that depth and batch: parameters agree;
- hyperparameters: what scripts/base_train.py computes at depth 12, 20, 26 with default flags
  (batch size, steps, grad accumulation, learning rates, betas, weight decay, every schedule
  value of the run, parameter counts, FLOPs per token) equals armlab's;
- bpb: armlab's packed val bpb (the second number beside its whole-document one) equals nanochat's
  evaluate_bpb on the same model and batches, and its stream is nanochat's val stream (BOS-aligned
  best fit) on the same documents.

Each check prints its largest difference (pytest -s shows them).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from armlab.budget import flops_per_token, param_counts, training_budget
from armlab.evaluate.packed import evaluate_packed_bpb, packed_rows, packed_set
from armlab.spec import ModelSpec, parse_experiment
from armlab.train import recipe, schedule
from armlab.train.model import GPTConfig, build_model
from armlab.train.optim import build_optimizer
from reference_util import COMMIT, base_train_namespace, nanochat
from tok_util import stdlib_docs, trained_tokenizer, write_shards

SEQ = 512  # short windows are 128 tokens: SSSL is really active
VOCAB = 512


def reference_model(nc, cfg: GPTConfig, seed: int, random_weights: bool = True):
    """nanochat's GPT for armlab's config, built its way (meta, to_empty, init_weights), then
    (by default) every parameter replaced with random values: zero-initialised projections,
    gates and lambdas would hide differences."""
    with torch.device("meta"):
        ref = nc.gpt.GPT(nc.gpt.GPTConfig(**cfg.nanochat_config()))
    ref.to_empty(device="cpu")
    torch.manual_seed(seed)
    ref.init_weights()
    if random_weights:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                scale = (
                    p.shape[-1] ** -0.5
                    if p.ndim == 2 and "wte" not in name and "value_embeds" not in name
                    else 0.5
                )
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "resid_lambdas" in name else 0.0))
    return ref.eval()


def experiment(depth: int, vocab: int = VOCAB, seq: int = 2048, **train):
    return parse_experiment(
        {"name": "parity", "pool": {"uri": "p"}, "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
         "tokenizer": {"vocab_size": vocab}, "model": {"depth": depth, "max_seq_len": seq}, "train": train}
    )  # fmt: skip


@pytest.mark.parametrize("depth", [2, 4])
def test_forward_matches_nanochat_layer_by_layer(depth: int) -> None:
    nc = nanochat()
    cfg = GPTConfig(depth=depth, vocab_size=VOCAB, seq_len=SEQ)
    ref = reference_model(nc, cfg, seed=depth)
    ours = build_model(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    assert (
        [w for w, _ in ref.window_sizes]
        == ours.window_sizes
        == ([128, 512] if depth == 2 else [128, 128, 128, 512])
    )
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    outputs: dict[str, dict[int, torch.Tensor]] = {"ref": {}, "ours": {}}
    for side, model in (("ref", ref), ("ours", ours)):
        for i, block in enumerate(model.transformer.h):
            block.register_forward_hook(
                lambda m, a, out, i=i, side=side: outputs[side].__setitem__(i, out.detach())
            )
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits_ref, logits_ours = ref(x), ours(x)
        inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        loss_ref = ref(inputs, targets, loss_reduction="none")
        loss_ours = ours(inputs, targets, loss_reduction="none")
    per_layer = [(outputs["ref"][i] - outputs["ours"][i]).abs().max().item() for i in range(depth)]
    diff = (logits_ref - logits_ours).abs().max().item()
    print(f"\nforward d{depth} vs nanochat {COMMIT}: max |block output diff| per layer {per_layer}, "
          f"max |logit diff| {diff:.3g} (logits up to {logits_ref.abs().max().item():.2f})")  # fmt: skip
    assert max(per_layer) <= 1e-5 and diff <= 1e-5
    assert (loss_ref - loss_ours).abs().max().item() <= 1e-5
    assert logits_ref.std() > 0.5  # the random weights make a real, non-trivial function


def test_same_seed_same_initial_weights() -> None:
    nc = nanochat()
    cfg = GPTConfig(depth=4, vocab_size=VOCAB, seq_len=SEQ)
    ref = reference_model(nc, cfg, seed=11, random_weights=False)
    torch.manual_seed(11)
    ours = build_model(cfg)
    diffs = {k: (v - ours.state_dict()[k]).abs().max().item() for k, v in ref.state_dict().items()}
    print(f"\ninit d4, seed 11: max |weight diff| {max(diffs.values()):.3g}")
    assert max(diffs.values()) == 0.0


def _set_schedule(optimizer, lr_mult: float, momentum: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:  # what both training loops do before each step
        group["lr"] = group["initial_lr"] * lr_mult
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = weight_decay


@pytest.mark.parametrize("depth", [2, 4])
def test_three_optimizer_steps_match_nanochat(depth: int) -> None:
    """Identical weights and gradients; nanochat's optimiser set up exactly as base_train sets it up
    for this depth (its own flags' defaults, batch size and scaling), armlab's from its recipe."""
    nc = nanochat()
    ns = base_train_namespace(["--depth", str(depth)], VOCAB)
    args, bs = ns["args"], ns["batch_lr_scale"]
    cfg = GPTConfig(depth=depth, vocab_size=VOCAB, seq_len=2048)
    ref = reference_model(nc, cfg, seed=depth)
    ours = build_model(cfg)
    ours.load_state_dict(ref.state_dict())
    ref_opt = ref.setup_optimizer(
        unembedding_lr=args.unembedding_lr * bs,
        embedding_lr=args.embedding_lr * bs,
        scalar_lr=args.scalar_lr * bs,
        matrix_lr=args.matrix_lr * bs,
        weight_decay=ns["weight_decay_scaled"],
    )  # fmt: skip  (base_train's call)
    exp = experiment(depth)
    budget = training_budget(exp)
    hp = recipe.resolve(exp.train)
    scale = schedule.scaling(budget, hp.weight_decay)
    our_opt = build_optimizer(ours, **scale.learning_rates(hp))
    n = budget.num_iterations
    g = torch.Generator().manual_seed(100 + depth)
    diffs = []
    for step in range(3):
        grads = {name: torch.randn(p.shape, generator=g) for name, p in ref.named_parameters()}
        for model in (ref, ours):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        _set_schedule(
            ref_opt,
            ns["get_lr_multiplier"](step),
            ns["get_muon_momentum"](step),
            ns["get_weight_decay"](step),
        )
        _set_schedule(
            our_opt,
            schedule.lr_multiplier(step, n, hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac),
            schedule.muon_momentum(step, n, hp.warmdown_ratio),
            schedule.weight_decay(step, n, scale.weight_decay),
        )
        with torch.compiler.set_stance("force_eager"):  # nanochat's steps are torch.compile'd; eager on CPU
            ref_opt.step()
        our_opt.step()
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        diffs.append(max((ref_sd[k] - our_sd[k]).abs().max().item() for k in ref_sd))
    # the updates themselves, relative to their size per tensor: warmup learning rates are small,
    # so an absolute bound alone would hide a different update rule
    start = reference_model(nc, cfg, seed=depth).state_dict()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    rel = max(
        ((ref_sd[k] - start[k]) - (our_sd[k] - start[k])).abs().max().item()
        / (ref_sd[k] - start[k]).abs().max().item()
        for k in start
    )
    moved = min((ref_sd[k] - start[k]).abs().max().item() for k in start)
    print(f"\noptimizer d{depth}, batch {budget.total_batch_size:,}: max |param diff| after steps 1-3 {diffs}, "
          f"max relative update diff {rel:.3g} (every tensor moved, the least by {moved:.3g})")  # fmt: skip
    assert max(diffs) <= 1e-6 and rel <= 1e-4
    assert moved > 0  # every parameter really took the steps


@pytest.mark.parametrize("depth", [12, 20, 26])
def test_hyperparameters_equal_base_train_defaults(depth: int) -> None:
    """What scripts/base_train.py computes for `--depth D` (default flags; vocab 32768, its
    tokenizer's), executed from the script's own statements, equals armlab's for the same model."""
    vocab = 32768
    ns = base_train_namespace(["--depth", str(depth)], vocab)
    args = ns["args"]
    exp = experiment(depth, vocab=vocab, seq=args.max_seq_len, device_batch_size=args.device_batch_size)
    budget = training_budget(exp)
    hp = recipe.resolve(exp.train)
    scale = schedule.scaling(budget, hp.weight_decay)
    from armlab.budget import grad_accum_steps

    # model size and horizon
    pc, ref_pc = budget.params, ns["param_counts"]
    assert (pc.wte, pc.value_embeds, pc.lm_head, pc.transformer_matrices, pc.scalars, pc.total) == (
        ref_pc["wte"], ref_pc["value_embeds"], ref_pc["lm_head"], ref_pc["transformer_matrices"],
        ref_pc["scalars"], ref_pc["total"],
    )  # fmt: skip
    assert budget.flops_per_token == ns["num_flops_per_token"]
    assert budget.target_tokens == ns["target_tokens"] and budget.reference_tokens == ns["D_REF"]
    assert budget.total_batch_size == ns["total_batch_size"]
    assert budget.num_iterations == ns["num_iterations"]
    assert (
        grad_accum_steps(budget.total_batch_size, args.device_batch_size, args.max_seq_len, 1)
        == ns["grad_accum_steps"]
    )
    assert scale.batch_lr_scale == ns["batch_lr_scale"] and scale.weight_decay == ns["weight_decay_scaled"]
    # the optimiser's groups: same parameters (by name), lr, betas, eps, weight decay, Muon settings
    with torch.device("meta"):
        ours = build_model(GPTConfig.from_spec(exp.model, vocab), "meta")
    our_opt = build_optimizer(ours, **scale.learning_rates(hp))
    ref_names = {id(p): n for n, p in ns["model"].named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    keys = ("kind", "lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "ns_steps", "beta2")

    def groups(opt, names):
        return [({k: g.get(k) for k in keys}, [names[id(p)] for p in g["params"]]) for g in opt.param_groups]

    assert groups(our_opt, our_names) == groups(ns["optimizer"], ref_names)
    # every schedule value of the whole run
    n = budget.num_iterations
    ours_sched = [
        (schedule.lr_multiplier(s, n, hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac),
         schedule.muon_momentum(s, n, hp.warmdown_ratio), schedule.weight_decay(s, n, scale.weight_decay))
        for s in range(n)
    ]  # fmt: skip
    ref_sched = [
        (ns["get_lr_multiplier"](s), ns["get_muon_momentum"](s), ns["get_weight_decay"](s)) for s in range(n)
    ]
    assert ours_sched == ref_sched
    print(f"\nd{depth}: batch {budget.total_batch_size:,} x {n:,} steps (accum {ns['grad_accum_steps']}), "
          f"lr scale {scale.batch_lr_scale:.4f}, weight decay {scale.weight_decay:.6f}, "
          f"{budget.flops_per_token:.4e} FLOPs/token: all equal to base_train's")  # fmt: skip


def test_flops_count_windows_per_layer_like_nanochat() -> None:
    nc = nanochat()
    for depth, seq, pattern in ((4, 2048, "SSSL"), (6, 1024, "SL"), (3, 2048, "L")):
        spec = ModelSpec(depth=depth, max_seq_len=seq, window_pattern=pattern)
        cfg = GPTConfig.from_spec(spec, 1000)
        with torch.device("meta"):
            ref = nc.gpt.GPT(nc.gpt.GPTConfig(**cfg.nanochat_config()))
        assert flops_per_token(spec, 1000) == ref.estimate_flops()
        assert param_counts(spec, 1000).total == ref.num_scaling_params()["total"]


# -- bits per byte and the eval stream ------------------------------------------------------------
def _documents() -> list[str]:
    """Several thousand real documents of varied length: stdlib docstrings' paragraphs and lines."""
    mods = ["json", "os", "collections", "pathlib", "functools", "itertools", "textwrap", "argparse",
            "inspect", "re", "string", "dataclasses", "subprocess", "threading", "logging",
            "email", "http", "urllib", "xml", "csv", "datetime", "decimal", "fractions", "statistics"]  # fmt: skip
    paragraphs = [p.strip() for d in stdlib_docs(mods, min_chars=20) for p in d.split("\n\n")]
    return [t for p in paragraphs for t in (p, *p.splitlines()[1:]) if len(t.strip()) > 10]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-bpb")
    tok = trained_tokenizer(root)
    docs = _documents()
    eval_dir = write_shards(root / "eval", docs, files=1, row_group_rows=256)
    return tok, eval_dir, docs


def test_bpb_equals_nanochat_evaluate_bpb(eval_setup) -> None:
    nc = nanochat()
    tok, eval_dir, _ = eval_setup
    T, B = 64, 4
    cfg = GPTConfig(depth=2, vocab_size=tok.vocab_size, seq_len=T)
    ref = reference_model(nc, cfg, seed=5)
    ours = build_model(cfg)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    rows = packed_rows(eval_dir, tok, 12 * B * T, T).tokens  # 12 full batches
    batches = [
        (
            torch.from_numpy(rows[i : i + B, :-1].astype(np.int64)),
            torch.from_numpy(rows[i : i + B, 1:].astype(np.int64)),
        )
        for i in range(0, len(rows), B)
    ]
    token_bytes = torch.as_tensor(tok.token_bytes, dtype=torch.int64)
    theirs = nc.loss_eval.evaluate_bpb(ref, batches, len(batches), token_bytes)
    mine = evaluate_packed_bpb(ours, tok, eval_dir, 12 * B * T, B, T, "cpu")
    print(f"\nbpb on {mine.tokens:,} tokens: armlab {mine.bpb:.8f}, nanochat evaluate_bpb {theirs:.8f}, "
          f"|diff| {abs(mine.bpb - theirs):.3g}")  # fmt: skip
    assert abs(mine.bpb - theirs) <= 1e-6
    assert 1.0 < theirs < 2 * math.log2(tok.vocab_size)


def test_eval_stream_is_nanochat_val_stream(eval_setup) -> None:
    """nanochat's own val loader (tokenizing_distributed_data_loader_bos_bestfit, split="val",
    which reads the last parquet file of its data dir) on the eval set gives armlab's eval rows.
    They agree until armlab's one-pass stream runs dry; nanochat's then wraps into a second pass."""
    nc = nanochat()
    tok, eval_dir, docs = eval_setup
    T, B = 64, 8
    data_dir = nc.base_dir / "base_data_climbmix"
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pq.read_table(eval_dir / "shard_00000.parquet"), data_dir / "shard_00000.parquet", row_group_size=256
    )
    theirs_tok = nc.tokenizer.RustBPETokenizer(tok.enc, "<|bos|>")
    loader = nc.dataloader.tokenizing_distributed_data_loader_bos_bestfit(
        theirs_tok, B, T, split="val", device="cpu"
    )
    ours = packed_rows(eval_dir, tok, None, T).tokens
    # the rows armlab packed while its buffer could still be refilled (nanochat's never runs dry)
    # (it keeps >= 1000 documents buffered, reading 128 at a time, so it runs dry once it has
    # placed len(docs) - 1128 of them)
    owners = packed_set(eval_dir, tok, T).docs
    placed = np.array([len(np.unique(owners[: k + 1])) for k in range(len(owners))])
    n_check = int((placed < len(docs) - 1000 - 128).sum())
    theirs = []
    while len(theirs) * B < n_check:
        x, y = next(loader)
        theirs.append(torch.cat([x, y[:, -1:]], dim=1).numpy())
    theirs = np.concatenate(theirs)[:n_check]
    assert n_check > 100, f"too few documents ({len(docs)}) for a meaningful comparison"
    mismatched = int((theirs != ours[:n_check]).any(axis=1).sum())
    print(
        f"\neval stream: first {n_check} of {len(ours)} rows (T={T}, {len(docs):,} documents) vs nanochat's val "
        f"loader: {mismatched} rows differ"
    )
    assert mismatched == 0
    # and the rows after: nanochat's second pass mixes in, armlab's stream ends (the documented difference)
