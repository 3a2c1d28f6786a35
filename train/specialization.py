"""`python -m train.specialization RUN_DIR`: which experts each domain's tokens go to, per MoE layer.

The run's model (its latest checkpoint, or --step N; whatever layout saved it, read on this one
process, in eval mode, fp32) reads each domain's validation documents -- the held-out documents of
the run's corpus, re-tokenised with the run's tokenizer (at most --max-tokens per domain), in two
halves: the even-numbered documents one after another as in val.bin, cut into blocks of
train.seq_len tokens, then the odd-numbered ones. Every MoE layer's router choices are counted
(token copies, k per token, as `MoEStats.tokens_per_expert` counts them: before any capacity drop).
Domains: `shakespeare` and `bible` for the classics corpus; for data.corpus=files or hub, the
column data.domain_field names (set in training, or here with --domain-field).

Written to RUN_DIR/specialization/:
  specialization.png   per MoE layer, a domains × experts heatmap of shares
  specialization.md    the same as tables, with each layer's Jensen-Shannon divergence
  expert_shares.csv    layer, domain, expert, copies, share (one row each)
  specialization.json  all of it, for scripts

Each layer's number is the generalised Jensen-Shannon divergence between the domains' expert
distributions P_1..P_N, with equal weights: H(mean_n P_n) - mean_n H(P_n), H the entropy in bits
(log base 2). 0: every domain spreads over the experts alike; 1: two domains never share an expert
(at most log2 N for N domains). Equal weights keep the figure independent of how many validation
tokens each domain has; for two domains it is the usual JS divergence. Its yardstick: the JS
divergence between the two halves of one domain (averaged over the domains with two documents or
more) is how much routing differs between texts of the same domain. A divergence between domains
well above it is domain specialisation.

Shape legend: L MoE layers, N domains, E experts, B blocks, S tokens per block.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from models.moe.layer import tokens_per_expert_LE
from train.cli import run_tool, tool_parser

DEFAULT_MAX_TOKENS = 1_000_000  # per domain: enough for stable shares, bounded for a large corpus


def js_divergence(dist_NE: np.ndarray) -> float:
    """Generalised Jensen-Shannon divergence (equal weights, bits) of the N rows, each a distribution."""
    dist_NE = np.asarray(dist_NE, dtype=np.float64)
    assert dist_NE.ndim == 2 and np.allclose(dist_NE.sum(axis=1), 1.0), "rows must be distributions"
    return max(0.0, entropy_bits(dist_NE.mean(axis=0)) - float(np.mean([entropy_bits(p) for p in dist_NE])))


def entropy_bits(p_E: np.ndarray) -> float:
    p_E = p_E[p_E > 0]  # 0 · log 0 = 0
    return float(-(p_E * np.log2(p_E)).sum())


def document_ids(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """Each document's ids as training tokenized it (then end-of-text), until `max_tokens` in all
    (the last document cut)."""
    docs: list[list[int]] = []
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = (tokenizer.encode(text) + [tokenizer.eot_id])[: max_tokens - total]
        docs.append(ids)
        total += len(ids)
    return docs


def token_blocks(ids: list[int], seq_len: int, batch: int) -> list[torch.Tensor]:
    """[B, S] blocks of consecutive tokens, B <= batch; the remainder as a last, shorter block."""
    full = len(ids) // seq_len
    rows_BS = torch.tensor(ids[: full * seq_len], dtype=torch.long).view(full, seq_len)
    blocks = list(rows_BS.split(batch)) if full else []
    if len(ids) > full * seq_len:
        blocks.append(torch.tensor(ids[full * seq_len :], dtype=torch.long)[None])
    return blocks


@torch.no_grad()
def expert_copies(model, blocks: list[torch.Tensor]) -> torch.Tensor:
    """[L, E] token copies each MoE layer routed to each expert, over all blocks (eval mode)."""
    model.eval()
    total_LE = None
    for idx_BS in blocks:
        _, stats = model(idx_BS)
        copies_LE = tokens_per_expert_LE(stats)
        total_LE = copies_LE if total_LE is None else total_LE + copies_LE
    assert total_LE is not None, "no tokens"
    return total_LE


def group_by_domain(labelled: list[tuple[str, str]], describe: str) -> dict[str, list[str]]:
    """Documents per domain, domains in order of first appearance; at least two domains."""
    docs: dict[str, list[str]] = {}
    for domain, text in labelled:
        docs.setdefault(domain, []).append(text)
    if len(docs) < 2:
        found = ", ".join(repr(d) for d in docs) or "none"
        raise ValueError(
            f"{describe}: the validation split holds {len(docs)} domain(s) ({found}); the report compares "
            f"at least two (for files, the last data.val_fraction of the rows is validation: mix the domains' rows)"
        )
    return docs


def measure(model, docs: dict[str, list[str]], tokenizer, seq_len: int, batch: int, max_tokens: int) -> dict:
    """Per domain: documents and tokens read, and the [L, E] copies of each half of its documents
    (the even-numbered ones, then the odd-numbered ones; each half one stream of blocks)."""
    out = {}
    for domain, texts in docs.items():
        ids = document_ids(texts, tokenizer, max_tokens)
        halves = [[t for doc in ids[first::2] for t in doc] for first in (0, 1)]
        out[domain] = {
            "documents": len(ids),
            "tokens": sum(map(len, halves)),
            "halves_copies_LE": [expert_copies(model, token_blocks(h, seq_len, batch)).numpy() for h in halves if h],
        }
    return out


def per_layer_figures(measured: dict, top_k: int) -> list[dict]:
    """Per MoE layer: copies and shares per domain, the JS divergence between the domains, and
    within each domain of several documents, between its two halves."""
    domains = list(measured)
    num_layers = measured[domains[0]]["halves_copies_LE"][0].shape[0]
    layers = []
    for layer in range(num_layers):
        halves = {d: [copies_LE[layer] for copies_LE in measured[d]["halves_copies_LE"]] for d in domains}
        copies = {d: sum(halves[d]) for d in domains}
        for d in domains:
            assert int(copies[d].sum()) == measured[d]["tokens"] * top_k, "every token goes to top_k experts"
        shares = {d: copies[d] / copies[d].sum() for d in domains}
        within = {d: js_divergence(np.stack([h / h.sum() for h in halves[d]])) for d in domains if len(halves[d]) == 2}
        layers.append(
            {
                "layer": layer,
                "copies": {d: [int(c) for c in copies[d]] for d in domains},
                "shares": {d: [float(s) for s in shares[d]] for d in domains},
                "js_divergence": js_divergence(np.stack([shares[d] for d in domains])),
                "js_divergence_within": within,
                "js_divergence_within_mean": float(np.mean(list(within.values()))) if within else None,
            }
        )
    return layers


def labelled_documents(job, domain_field: str | None) -> tuple[list[tuple[str, str]], str]:
    """The run's validation documents with their domains, and how the domains were named."""
    from train.data.prepare import check_domain_field
    from train.data.sources import labelled_val_documents

    data = job.data
    if domain_field is not None:
        data.domain_field = domain_field
    check_domain_field(data)
    if data.corpus == "classics":
        return labelled_val_documents(data), "the classics corpus (shakespeare, bible)"
    if not data.domain_field:
        raise ValueError(
            f"data.domain_field is not set in this run (data.corpus={data.corpus}): name the column that holds "
            "each row's domain, here (--domain-field NAME) or in training (data.domain_field=NAME)"
        )
    return labelled_val_documents(data), f"data.domain_field={data.domain_field!r}"


def specialization(
    run_dir: Path, step: int | None = None, domain_field: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict:
    """The report's figures for `run_dir` (what specialization.json holds)."""
    from train.checkpoint.run_weights import load_run_weights

    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1; got {max_tokens}")
    weights = load_run_weights(run_dir, step)
    job = weights.job
    model = weights.build_model()
    if not model.moe_layers():
        raise ValueError(
            f"{run_dir}: the run's model has no MoE layer (model.n_layers={job.model.n_layers}, "
            f"moe.every={job.moe.every}): there is no routing to report"
        )
    labelled, source = labelled_documents(job, domain_field)
    docs = group_by_domain(labelled, source)
    measured = measure(model, docs, weights.tokenizer, job.train.seq_len, job.train.micro_batch, max_tokens)
    layers = per_layer_figures(measured, job.moe.top_k)
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "step": weights.step,
        "checkpoint": str(weights.checkpoint),
        "domains_from": source,
        "domains": list(measured),
        "top_k": job.moe.top_k,
        "num_experts": job.moe.num_experts,
        "log_base": 2,
        "documents": {d: m["documents"] for d, m in measured.items()},
        "tokens": {d: m["tokens"] for d, m in measured.items()},
        "js_divergence_per_layer": [layer["js_divergence"] for layer in layers],
        "layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / "specialization.png",
        out_dir / "specialization.md",
        out_dir / "expert_shares.csv",
        out_dir / "specialization.json",
    ]
    plot_heatmaps(result, paths[0])
    paths[1].write_text(markdown(result))
    with open(paths[2], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "domain", "expert", "copies", "share"])
        for layer in result["layers"]:
            for d in result["domains"]:
                for e, (c, s) in enumerate(zip(layer["copies"][d], layer["shares"][d], strict=True)):
                    writer.writerow([layer["layer"], d, e, c, f"{s:.6f}"])
    paths[3].write_text(json.dumps(result, indent=2) + "\n")
    return paths


def markdown(result: dict) -> str:
    domains, num_experts = result["domains"], result["num_experts"]
    lines = [
        f"# Expert specialisation: {result['run_dir']} (step {result['step']})",
        "",
        f"Share of each domain's token copies (top-{result['top_k']}: {result['top_k']} per token) that each expert "
        f"receives, in eval mode, on the validation documents; domains from {result['domains_from']}. "
        "JS: Jensen-Shannon divergence between the domains' expert distributions (equal weights, bits: "
        f"0 = alike, at most log2({len(domains)}) = {np.log2(len(domains)):.3g}).",
        "",
        "| domain | documents | tokens |",
        "|---|---|---|",
    ]
    lines += [f"| {d} | {result['documents'][d]} | {result['tokens'][d]} |" for d in domains]
    lines += [
        "",
        "| MoE layer | JS divergence between domains (bits) | within a domain: even vs odd documents |",
        "|---|---|---|",
    ]
    lines += [
        f"| {layer['layer']} | {layer['js_divergence']:.4f} | {within_text(layer)} |" for layer in result["layers"]
    ]
    for layer in result["layers"]:
        lines += [
            "",
            f"## MoE layer {layer['layer']}: JS divergence {layer['js_divergence']:.4f} bits",
            "",
            "| domain | " + " | ".join(f"expert {e}" for e in range(num_experts)) + " |",
            "|---|" + "---|" * num_experts,
        ]
        lines += [f"| {d} | " + " | ".join(f"{100 * s:.1f}%" for s in layer["shares"][d]) + " |" for d in domains]
    return "\n".join(lines) + "\n"


def within_text(layer: dict) -> str:
    mean = layer["js_divergence_within_mean"]
    return "n/a (one document per domain)" if mean is None else f"{mean:.4f}"


def plot_heatmaps(result: dict, out: Path) -> None:
    from train.plots import plt  # matplotlib, set up for files only

    domains, layers = result["domains"], result["layers"]
    num_experts = result["num_experts"]
    height = (0.5 * len(domains) + 1.2) * len(layers)
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(5, 0.6 * num_experts + 2), height), squeeze=False)
    vmax = max(max(max(s) for s in layer["shares"].values()) for layer in layers)
    for layer, ax in zip(layers, axes[:, 0], strict=True):
        share_NE = np.array([layer["shares"][d] for d in domains])
        image = ax.imshow(share_NE, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        if num_experts <= 16:
            for (n, e), share in np.ndenumerate(share_NE):
                ax.text(
                    e,
                    n,
                    f"{100 * share:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share < 0.6 * vmax else "black",
                )
        ax.set_yticks(range(len(domains)), domains)
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
        ax.set(title=f"MoE layer {layer['layer']}: JS divergence {layer['js_divergence']:.3f} bits", xlabel="expert")
        fig.colorbar(image, ax=ax, label="share")
    fig.suptitle("share of each domain's token copies per expert (cells in %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = tool_parser("python -m train.specialization", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a checkpoint (outputs/<run_name>)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--domain-field",
        default=None,
        help="the column holding each row's domain (overrides the run's data.domain_field)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="per domain, at most this many validation tokens"
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/specialization)")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()  # reading the corpus again: errors stay one line

    def report() -> None:
        result = specialization(Path(args.run_dir), args.step, args.domain_field, args.max_tokens)
        paths = write_outputs(result, Path(args.out) if args.out else Path(args.run_dir) / "specialization")
        print_results(result, paths)

    return run_tool(report)


def print_results(result: dict, paths: list[Path]) -> None:
    for layer in result["layers"]:
        print(
            f"MoE layer {layer['layer']}: JS divergence {layer['js_divergence']:.4f} bits between domains "
            f"({within_text(layer)} within a domain)"
        )
    for path in paths:
        print(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
