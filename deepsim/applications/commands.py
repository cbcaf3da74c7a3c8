"""Subcommands of ``deepsim`` for the VAE, the inversion and the evaluation (registered by deepsim.cli):

    deepsim invert --checkpoint C IMAGE... --out DIR                      input | reconstruction PNGs
    deepsim sample-preimages --checkpoint C IMAGE... --samples S --out DIR  S pre-images per image
                                                                          + diversity.json
    deepsim sample-vae --checkpoint C --out F.png [--samples 64]           decoded samples from the prior
    deepsim eval --checkpoint C [C...] --data PATH [--split test] [--out DIR]  normalized error (+ STL-10 SVM)

Each handler takes the parsed arguments and returns the exit code; the work is in library functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepsim.config import MAX_IMAGE_PIXELS_COMMAND_HELP, TrainConfig

__all__ = [
    "add_subcommands",
    "add_download_weights_flag",
    "add_max_image_pixels_flag",
    "add_trust_flag",
    "picked",
    "HANDLERS",
]


def picked(args, *names: str) -> dict:
    """``{name: args.<name>}``: the keyword arguments a library call takes as they were parsed."""
    return {name: getattr(args, name) for name in names}


def add_download_weights_flag(parser) -> None:
    """``--download-weights`` (train, invert, sample-preimages, eval): fetch missing torchvision weights
    (AlexNet, VGG16) into torch's cache; :func:`deepsim.cli.main` runs the command inside
    :func:`deepsim.comparators.allow_weight_downloads` when it is given."""
    help = (
        "fetch torchvision's AlexNet / VGG16 weights into torch's cache when a comparator or the "
        "inverted network needs them and they are missing (needs internet; SHA-256 checked)"
    )
    parser.add_argument("--download-weights", action="store_true", help=help)


def add_trust_flag(parser) -> None:
    """``--trust-checkpoint``, for every command that opens a checkpoint."""
    help = (
        "open a checkpoint whose pickle needs more than tensors (a file from an older version, or from "
        "elsewhere): unpickling it can run any code it holds, so only for files whose origin you trust"
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=help)


def add_max_image_pixels_flag(parser, help: str = MAX_IMAGE_PIXELS_COMMAND_HELP) -> None:
    """``--max-image-pixels`` (``deepsim train``'s TrainConfig field, for the other commands that read
    images): the header pixel limit of :func:`deepsim.data.images.read_image`, train's default."""
    parser.add_argument("--max-image-pixels", type=int, default=TrainConfig.max_image_pixels, help=help)


def add_subcommands(sub) -> None:
    """Add the four subcommands to the ``deepsim`` argument parser's subparsers."""
    _add_invert_parser(sub)
    _add_sample_preimages_parser(sub)
    _add_sample_vae_parser(sub)
    _add_eval_parser(sub)


def _add_invert_parser(sub) -> None:
    """Add ``deepsim invert`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "invert", help="reconstruct images from their AlexNet features with an 'invert' checkpoint"
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint.pt of a 'deepsim train invert' run"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for <name>_inversion.png (input left)")
    p.add_argument("--device", default="auto")
    add_max_image_pixels_flag(p)
    add_download_weights_flag(p)
    add_trust_flag(p)


def _add_sample_preimages_parser(sub) -> None:
    """Add ``deepsim sample-preimages`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "sample-preimages",
        help="sample pre-images of AlexNet features (noise injected beside them, --noise-dim)",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint.pt of an 'invert' run with --noise-dim K"
    )
    p.add_argument("--samples", type=int, default=8, help="samples per image (at least 2)")
    p.add_argument(
        "--out", required=True, type=Path, help="folder for <name>_preimages.png and diversity.json"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--device", default="auto")
    add_max_image_pixels_flag(p)
    add_download_weights_flag(p)
    add_trust_flag(p)


def _add_sample_vae_parser(sub) -> None:
    """Add ``deepsim sample-vae`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "sample-vae", help="decode samples from the prior N(0, I) of a trained VAE into a PNG grid"
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint.pt of a 'deepsim train vae' run"
    )
    p.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    p.add_argument("--samples", type=int, default=64, help="number of samples")
    p.add_argument("--nrow", type=int, default=8, help="samples per grid row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_trust_flag(p)


def _add_eval_parser(sub) -> None:
    """Add ``deepsim eval`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "eval",
        help="normalized reconstruction error on a test set (+ linear SVM on STL-10 codes); "
        "Markdown + JSON tables",
        description="Evaluate checkpoints: the normalized Euclidean error mean ||G(x) - y|| / N (N = mean "
        "distance over all test pairs); for several inversion checkpoints, a table per layer; for "
        "autoencoder (and VAE) checkpoints on an STL-10 folder with labels and fold_indices.txt, a linear "
        "SVM on the codes trained on each of the 10 training folds and tested on the test set.",
    )
    p.add_argument(
        "--checkpoint", required=True, nargs="+", type=Path, help="one or more checkpoint.pt files"
    )
    p.add_argument(
        "--data", required=True, help="test images: a folder, 'photos', or an STL-10 binary folder"
    )
    p.add_argument(
        "--split", default=None, help="STL-10 split of the reconstruction test set (default: test)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the tables (default: <first checkpoint's folder>/eval)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-images", type=int, default=None, help="evaluate at most N test images (memory: N x image)"
    )
    p.add_argument(
        "--crop-size", type=int, default=None, help="autoencoder: centre-crop side (default: the run's)"
    )
    p.add_argument("--no-svm", action="store_true", help="skip the STL-10 SVM on the codes")
    p.add_argument("--svm-c", type=float, default=1.0, help="the linear SVM's C")
    p.add_argument("--device", default="auto")
    add_download_weights_flag(p)
    add_trust_flag(p)


def _cmd_invert(args) -> int:
    from deepsim.applications.tools import invert_files

    options = picked(args, "device", "max_image_pixels")
    for path, error in invert_files(args.checkpoint, args.images, args.out, **options):
        print(f"{path}: squared error per pixel {error:.5f}")
    return 0


def _cmd_sample_preimages(args) -> int:
    from deepsim.applications.tools import sample_preimages

    options = picked(args, "samples", "seed", "device", "max_image_pixels")
    report = sample_preimages(args.checkpoint, args.images, args.out, **options)
    for name, value in report["images"].items():
        print(f"{name}: diversity (mean pairwise distance of {report['samples']} samples) {value:.4f}")
    print(f"mean diversity {report['mean_diversity']:.4f} -> {Path(args.out) / 'diversity.json'}")
    if not report["noise_dim"]:
        print(
            "note: this generator takes no noise (trained with --noise-dim 0), so all samples are identical"
        )
    return 0


def _cmd_sample_vae(args) -> int:
    from deepsim.applications.tools import sample_vae_prior

    path = sample_vae_prior(
        args.checkpoint, args.out, samples=args.samples, nrow=args.nrow, seed=args.seed, device=args.device
    )
    print(f"{args.samples} samples from the prior -> {path}")
    return 0


def _cmd_eval(args) -> int:
    from deepsim.eval import evaluate_checkpoints
    from deepsim.train.factory import resolve_device

    first = args.checkpoint[0]
    out = args.out or ((first if first.is_dir() else first.parent) / "eval")
    result = evaluate_checkpoints(
        args.checkpoint,
        args.data,
        out=out,
        **picked(args, "split", "batch_size", "max_images", "crop_size"),
        svm=not args.no_svm,
        svm_C=args.svm_c,
        device=resolve_device(args.device),
    )
    print(result["markdown"])
    print("tables: " + json.dumps(result["files"]))
    return 0


HANDLERS = {
    "invert": _cmd_invert,
    "sample-preimages": _cmd_sample_preimages,
    "sample-vae": _cmd_sample_vae,
    "eval": _cmd_eval,
}
