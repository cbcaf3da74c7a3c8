"""The README's measured result: an SE autoencoder and a DeePSiM autoencoder trained for the same steps on
the bundled photos, on the CPU, compared by the paper's normalized Euclidean error and a sharpness figure
(energy of the image gradient of the reconstruction over that of the target), with their reconstructions
side by side.

    python examples/se_vs_deepsim.py --steps 600 --out runs/se-vs-deepsim

Writes <out>/comparison.png (rows: targets, SE, DeePSiM), <out>/comparison.md and <out>/comparison.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from deepsim.config import get_preset
from deepsim.data import iterate_eval
from deepsim.eval.evaluate import RECONSTRUCTION_COLUMNS, evaluate_checkpoint
from deepsim.eval.tables import markdown_table
from deepsim.reconstruct import load_generator
from deepsim.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/se-vs-deepsim"))
    parser.add_argument("--eval-size", type=int, default=128, help="centre-crop side of the test images")
    args = parser.parse_args()

    base = get_preset("autoencoder-photos").replace(steps=args.steps, device="cpu", sample_every=args.steps)
    runs = {
        "se": base.replace(loss="se", out=str(args.out / "se")),
        "deepsim": base.replace(out=str(args.out / "deepsim")),
    }
    rows = []
    for name, config in runs.items():
        if not (Path(config.out) / "checkpoint.pt").is_file():
            train(config, progress=True)
        row = evaluate_checkpoint(Path(config.out), "photos", crop_size=args.eval_size, svm=False)["reconstruction"]
        rows.append({**row, "run": name})

    targets = next(iter(iterate_eval("photos", batch_size=8, crop_size=args.eval_size, mode="center")))
    pictures = [targets]
    with torch.no_grad():
        for config in runs.values():
            generator, _ = load_generator(config.out)
            pictures.append(generator(targets).clamp(-1, 1))
    grid = make_grid(torch.cat(pictures).add(1).div(2), nrow=len(targets), padding=2)
    save_image(grid, args.out / "comparison.png")

    columns = [("run", "run", "")] + [c for c in RECONSTRUCTION_COLUMNS if c[0] not in ("task", "layer", "checkpoint")]
    table = markdown_table(rows, columns)
    (args.out / "comparison.md").write_text(table + "\n")
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
