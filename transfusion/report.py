"""The build's pictures and report.md: learning curves, a text -> image sample grid, and the goals table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunefusion.transfusion import shapes


def plot_learning_curves(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = history.get("evals") or []
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 3.8))
    steps = np.asarray(history["step"])
    for ax, key, label in ((axes[0], "lm", "text next-token loss (nats)"),
                           (axes[1], "diffusion", "image diffusion loss (MSE)")):
        values = np.asarray(history[key])
        if len(values) == 0:
            continue
        k = max(1, len(values) // 100)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps, values, lw=0.5, alpha=0.35)
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"{k}-step mean")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if evals:
        ax = axes[2]
        at = [e["step"] for e in evals]
        for split, style in (("seen", "-"), ("held_out", "--")):
            ax.plot(at, [100 * e[split]["text_to_image_all"] for e in evals], "o" + style, color="C0",
                    label=f"text->image all attributes, {split}")
            ax.plot(at, [100 * e[split]["caption_exact"] for e in evals], "s" + style, color="C1",
                    label=f"caption exact, {split}")
        ax.set_ylim(0, 102)
        ax.set_xlabel(f"step (minutes of training at the last: {evals[-1]['minutes']:.1f})")
        ax.set_title("accuracy (quick check: 10 steps, 16 seen + held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evals_table(evals: list[dict]) -> list[str]:
    if not evals:
        return []
    lines = ["Learning curve (quick check during training: 10 Euler steps, 16 seen scenes and the held-out ones):", "",
             "| step | minutes | text->image seen | text->image held-out | caption seen | caption held-out |",
             "|---|---|---|---|---|---|"]
    for e in evals:
        s, h = e["seen"], e["held_out"]
        lines.append(f"| {e['step']} | {e['minutes']:.1f} | {s['text_to_image_all']:.0%} | "
                     f"{h['text_to_image_all']:.0%} | {s['caption_exact']:.0%} | {h['caption_exact']:.0%} |")
    return [*lines, ""]


def write_report(directory: Path, manifest: dict, history: dict, result: dict) -> None:
    from prunefusion.transfusion.evaluate import goals_table

    directory = Path(directory)
    recipe = manifest["recipe"]
    plot_learning_curves(history, directory / "loss_curve.png",
                         f"Transfusion {recipe['name']}: {manifest['num_parameters'] / 1e6:.2f}M parameters")
    images, labels = result["grid"]
    if images:
        shapes.image_grid(images, labels, columns=8, scale=3).save(directory / "samples.png")
    train = manifest["training"]
    lines = [
        f"# Transfusion `{recipe['name']}` on the shapes world", "",
        f"{manifest['num_parameters']:,} parameters, {recipe['n_layers']} layers x d={recipe['d_model']}, "
        f"{recipe['patchify']} patchify at patch {recipe['patch_size']}, predicts {recipe['prediction']}; "
        f"{train['steps']} steps of batch {recipe['batch_size']} in {train['seconds'] / 60:.1f} min on "
        f"{train['device']} ({train['dtype']}, {train['torch_threads']} threads).", "",
        f"Held-out combinations (never seen in training): {', '.join(manifest['data']['held_out_scenes'])}.", "",
        f"Evaluation: {result['settings']['steps']} Euler steps, guidance {result['settings']['guidance_scale']}, "
        "attributes read back from pixels by the deterministic checker; captions of jittered renders, greedy.", "",
        "| metric | seen | held-out | goal |", "|---|---|---|---|",
        *[f"| {m} | {s} | {h} | {g} |" for m, s, h, g in goals_table(result)], "",
        "![learning curves](loss_curve.png)", "",
        *_evals_table(history.get("evals") or []),
        "![text -> image samples (x = checker disagrees)](samples.png)", "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
