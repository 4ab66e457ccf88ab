"""The accuracy-against-density frontier of `benchmarks/accuracy.py --methods frontier` results, as a plot: one row of
panels per model, one panel per prompt length, one line per budget rule (over gamma) and one for budget_fraction.
Plain Python and matplotlib (no torch), so that `benchmarks/report.py` draws the combined plot of every model's file
and `accuracy.py` the plot of its own run. `save_figure` writes every benchmark figure (atomically).

    python3 benchmarks/frontier.py OUT.png accuracy_gemma3-270m_frontier.json accuracy_smollm2_frontier.json
"""

from __future__ import annotations

import io
import json
import sys

from plugins.atomic import atomic_write_bytes

YMAX_FRONTIER = 1.5  # the y axis ends here (copy loss / dense)
TOLERANCE = 0.03  # the target: copy loss within 3 % of dense (the dotted line)


def family(method: str) -> str:
    """The line a method belongs to in the frontier plot: its name without the gamma / fraction."""
    return method.split(" g0")[0] if " g0" in method else method.split(" ")[0]


def frontier_points(cell: dict) -> dict[str, list[tuple[float, float, str, bool | None]]]:
    """Per method family, (density on the copy task, copy loss / dense, method, passkey hits at least dense's) of
    one cell, sorted by density."""
    fams: dict[str, list] = {}
    dense = cell["copy_loss"].get("dense")
    hits_dense = cell["passkey_hits"].get("dense")
    for m, loss in cell["copy_loss"].items():
        if m == "dense" or dense is None or m not in cell.get("density_copy", {}):
            continue
        hits = cell["passkey_hits"].get(m)
        same = None if hits is None or hits_dense is None else sum(hits) >= sum(hits_dense)
        fams.setdefault(family(m), []).append((cell["density_copy"][m], loss / dense, m, same))
    return {f: sorted(p) for f, p in fams.items()}


def save_figure(fig, path: str, dpi: int) -> None:
    """Write a matplotlib figure as PNG through the project's atomic write (`plugins.atomic`), then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_frontier(results: list[dict], path: str) -> bool:
    """Copy loss relative to dense against density: a row of panels per result (model), a panel per length, a line
    per method family; open markers where passkey retrieval fell below dense; dotted: the +3 % line. The y axis stops
    at YMAX_FRONTIER so that the region near dense stays readable: a point above it is drawn on the top edge as a
    triangle labelled with its value. Written atomically; False (nothing written) when no result has a dense cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, [c for c in r["cells"] if "dense" in c["copy_loss"]]) for r in results]
    rows = [(r, cells) for r, cells in rows if cells]
    if not rows:
        return False
    ncol = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(6.5 * ncol, 5 * len(rows)), squeeze=False)
    fams = sorted({family(m) for r, _ in rows for m in r["methods"] if m != "dense"})
    for (result, cells), ax_row in zip(rows, axes):
        for ax in ax_row[len(cells) :]:
            ax.set_visible(False)
        for ax, cell in zip(ax_row, cells):
            points = frontier_points(cell)
            for fam, pts in sorted(points.items()):
                col = f"C{fams.index(fam) % 10}"
                ax.plot([p[0] for p in pts], [min(p[1], YMAX_FRONTIER) for p in pts], "-", color=col, label=fam, lw=1)
                for x, y, m, same in pts:
                    label = m[len(fam) :].strip()
                    if y > YMAX_FRONTIER:
                        y, label = YMAX_FRONTIER, f"{label} ({y:.1f}x)"
                    marker = "^" if y == YMAX_FRONTIER else "o"
                    ax.plot([x], [y], marker, color=col, mfc=col if same is not False else "white", clip_on=False)
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, -8 if marker == "^" else 3), textcoords="offset points")
            ax.axhline(1 + TOLERANCE, color="k", lw=0.7, ls=":")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.axvline(0.5, color="grey", lw=0.5, ls="--")
            ys = [p[1] for pts in points.values() for p in pts]
            ax.set(
                xlabel="mean kept-block density (copy task)",
                ylabel="copy loss / dense",
                title=f"{result['model']}, L={cell['seq_len']} (dense copy loss {cell['copy_loss']['dense']:.3f}; {result['device']})",
                xlim=(0, 1.02),
                ylim=(min(0.8, *ys) - 0.02, YMAX_FRONTIER),
            )
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
    fig.suptitle("Accuracy against density (open marker: passkey below dense; dotted: +3 % of dense)")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].endswith(".png") or not all(a.endswith(".json") for a in argv[1:]):
        print("usage: frontier.py OUT.png RESULT.json [RESULT.json ...]", file=sys.stderr)
        return 2
    results = []
    for name in argv[1:]:
        with open(name) as f:
            results.append(json.load(f))
    if not plot_frontier(results, argv[0]):
        print(f"frontier.py: no cell with a dense run in {argv[1:]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
