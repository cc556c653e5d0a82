"""Plots and tables of a distance measurement."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from prunefusion.compression.measure import DistanceTable


def write_csv(table: DistanceTable, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["n", "start", "end", "angular_last_token", "angular_all_tokens"])
        for n, row in table.last_token.items():
            for start, d in enumerate(row):
                writer.writerow([n, start, start + n, f"{d:.6f}", f"{table.all_tokens[n][start]:.6f}"])


def plot(table: DistanceTable, heatmap: Path, best: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    big = table.num_layers
    grid = np.full((big, big), np.nan)  # rows n = 1..L, columns l
    for n, row in table.last_token.items():
        grid[n - 1, : len(row)] = row
    fig, ax = plt.subplots(figsize=(7, 5.5))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r",
                      extent=(-0.5, big - 0.5, 0.5, big + 0.5))
    fig.colorbar(image, ax=ax, label="angular distance d(x^l, x^(l+n)), last token")
    ax.set_xlabel("first removed layer l (0-based)")
    ax.set_ylabel("block size n")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)

    sizes, starts, dists = [], [], []
    for n in range(1, big - 1):
        start, d = table.best(n)
        sizes.append(n)
        starts.append(start)
        dists.append(d)
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(sizes, starts, "o-", color="tab:blue", label="l*(n): first layer of the best block")
    ax1.set_xlabel("block size n")
    ax1.set_ylabel("l*(n)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(sizes, dists, "s--", color="tab:red", label="d*(n)")
    ax2.set_ylabel("d*(n) (angular distance)", color="tab:red")
    ax1.set_title("best block per size (final layer excluded)")
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(best, dpi=120)
    plt.close(fig)


def run_measure(model_dir: Path, out: Path, data: list[str], samples: int, seq_len: int, batch_size: int,
                texts: list[str] | None = None) -> DistanceTable:
    """Measure `model_dir` on calibration text (`texts`, else read from `data`); write distances.json,
    distances.csv and the two plots into out."""
    from prunefusion.checkpoints import weights_digest
    from prunefusion.compression.measure import measure, tokenized_batches
    from prunefusion.model_kinds import load_model
    from prunefusion.texts import load_texts

    model, tokenizer = load_model(model_dir)
    texts = (texts if texts is not None else load_texts(data))[:samples]
    batches = tokenized_batches(tokenizer, texts, seq_len, batch_size)
    table = measure(model, batches, total=len(batches))
    table.meta = {"model": str(model_dir), "weights_digest": weights_digest(model_dir),
                  "calibration": {"sources": data or ["stdlib corpus"], "seq_len": seq_len, "batch_size": batch_size}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "distances.json").write_text(json.dumps(table.to_json(), indent=1) + "\n")
    write_csv(table, out / "distances.csv")
    plot(table, out / "distance_heatmap.png", out / "best_blocks.png", f"{model_dir.name}: angular distances")
    return table
