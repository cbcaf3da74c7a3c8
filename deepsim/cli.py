"""The ``deepsim`` command line: a thin edge over the library.

    deepsim train [autoencoder] [--preset NAME] [--steps N] ...   train (default: the bundled photos)
    deepsim train TASK --help                                     that task's flags only, grouped
    deepsim reconstruct --checkpoint C IMAGE... --out DIR          autoencode images with a trained G
    deepsim data check PATH                                        report every bad image before a run
    deepsim data download stl10 DIR                                STL-10 into DIR/stl10_binary
                                                                   (checksums verified)
    deepsim presets [NAME]                                         the presets, their values and sources
    deepsim calibrate --comparator C --reference R --data DIR      lambda_feat of C from R's
                                                                   (deepsim.calibrate)
    deepsim bench [--groups kernels,loader,step] [--quick] [--out DIR]   throughput tables (= python -m bench)
    deepsim train vae | invert --layer conv5|fc6|fc7|fc8 ...       the VAE and AlexNet inversion (see below)
    deepsim invert | sample-preimages | sample-vae | eval ...      see deepsim.applications.commands
    deepsim import-caffe MODEL.caffemodel --layer fc6|fc7|pool5|caffenet --out F.pt
                                                                   the authors' Caffe models
    deepsim export --checkpoint RUN_OR_FILE --out G.safetensors    a generator (or checkpoint) as safetensors

`deepsim train vae` also writes <out>/prior_samples.png (64 decoded prior samples) at the end.
`deepsim train invert` without --preset takes the preset invert-<layer> (default layer: fc6).
The train flags come from TrainConfig's field metadata (deepsim.config.field_info; docs/cli.md); a flag of
another task is an error naming it. --random-weights runs offline (random comparator and inverted network).
The run's first line states the checkpoint size and the disk use of --keep-checkpoints K of them.
--compile, --precision, --loader and --channels-last default to auto: the fast path on CUDA, the simple one on
the CPU (deepsim.train.auto); the run's first line says what was chosen and why.

Files: every checkpoint is opened without running code (weights-only pickle or safetensors); a file whose
pickle needs more is refused unless --trust-checkpoint is given (README: "Files you did not make").
`deepsim train` without --resume refuses an --out that holds a run; import-caffe and export refuse to replace
a file without --force.

Exit statuses: 0 done; 2 bad input (one line naming the file, flag or tensor); 75 stopped by a stop signal
(SIGTERM, SIGINT, SIGUSR1: --stop-signals) after writing a checkpoint -- run the same command with
`--resume auto` to continue; 128 + N killed by a second signal N (e.g. 143), the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from deepsim.applications.commands import add_max_image_pixels_flag, picked
from deepsim.config import (
    FIELD_INFO,
    GROUPS,
    MAX_IMAGE_PIXELS_HELP,
    PRESETS,
    TASK_NAMES,
    TrainConfig,
    field_choices,
    get_preset,
)
from deepsim.tasks import (
    TASK_TABLE,
    TASKS,
    check_weights,
    checkpoint_bytes,
    crop_size,
    default_preset,
    resize_side,
    with_random_weights,
)

__all__ = ["main", "build_parser"]

# `deepsim train`'s flags come from the TrainConfig fields' metadata (deepsim.config.field_info): flag name,
# help, choices (the consuming modules' own tuples), group and tasks.
# The flags below are the ones that are no field.
TRAIN_FIELDS = [info for info in FIELD_INFO.values() if info.flag]
_TYPES = {"int": int, "float": float}


def _flag(info) -> str:
    return "--" + info.flag.replace("_", "-")


def _add_field_flag(group, info) -> None:
    """One TrainConfig field's flag, as its metadata describes it; its value lands in ``args.<field>``."""
    extra = dict(info.cli)
    action = extra.pop("action", None)
    if action == "bool":
        group.add_argument(
            _flag(info), dest=info.name, action=argparse.BooleanOptionalAction, default=None, help=info.help
        )
    elif action == "on-off-auto":
        group.add_argument(_flag(info), dest=info.name, help=info.help, **extra)
    else:
        kind = info.parse or _TYPES.get(str(TrainConfig.__dataclass_fields__[info.name].type), str)
        group.add_argument(
            _flag(info), dest=info.name, type=kind, choices=field_choices(info), help=info.help
        )


def _train_parser(parser: argparse.ArgumentParser, task: str | None) -> argparse.ArgumentParser:
    """Fill ``parser`` with ``deepsim train``'s arguments, grouped: every flag (``task`` None) or
    ``task``'s."""
    if task is None:
        parser.add_argument(
            "task",
            nargs="?",
            default=None,
            choices=sorted(TASK_TABLE),
            help="what to train (default: the --preset's task, else autoencoder); "
            "'deepsim train TASK --help' lists that task's flags only",
        )
    own = default_preset(task, "<layer>") if task else None  # invert: invert-<layer>
    parser.add_argument(
        "--preset",
        choices=sorted(p for p in PRESETS if task is None or PRESETS[p].task == task),
        help=f"named experiment (default: {own})"
        if own
        else "named experiment (default: the task's own: autoencoder-photos, invert-<layer>, vae-photos)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="auto|CHECKPOINT",
        help="'auto': continue from --out's newest valid checkpoint if there is one, else start fresh (the "
        "same command for the first start and every restart); a file or folder: continue from it; no value: "
        "from --out (an error if it has no checkpoint)",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for info in TRAIN_FIELDS:
        if task is None or task in info.tasks:
            _add_field_flag(groups[info.group], info)
    groups["output"].add_argument(
        "--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)"
    )
    groups["model"].add_argument(
        "--random-weights",
        action="store_true",
        help="offline: every comparator and the inverted network take random weights (alexnet -> "
        "alexnet-random, caffenet -> caffenet-random); the run's first line says so",
    )
    from deepsim.applications.commands import add_download_weights_flag, add_trust_flag

    add_download_weights_flag(groups["model"])
    add_trust_flag(groups["runtime"])
    return parser


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a generator with the DeePSiM loss",
        description="Train a DeePSiM generator. Without flags: the autoencoder on the bundled photos, a few "
        "minutes on a laptop CPU. Flags override the preset's values.",
    )
    _train_parser(p, None)


_TRAIN_DESCRIPTION = (
    "Flags override the preset's values; a flag of another task is an error naming that task."
)


def _task_help(argv: list[str]) -> str | None:
    """``deepsim train [TASK] ... --help``: the help of TASK (or of the --preset's task) with its flags only;
    every flag without either."""
    rest = [a for a in argv if a not in ("-h", "--help")]
    known, _ = _train_parser(argparse.ArgumentParser("deepsim train", add_help=False), None).parse_known_args(
        rest
    )
    task = known.task or (get_preset(known.preset).task if known.preset else None)
    if task is None:
        return None
    parser = argparse.ArgumentParser(
        prog=f"deepsim train {task}", description=f"{TASK_TABLE[task].summary}. {_TRAIN_DESCRIPTION}"
    )
    return _train_parser(parser, task).format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepsim",
        description="DeePSiM: generating images with perceptual similarity metrics "
        "(Dosovitskiy & Brox, 2016).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_reconstruct_parser(sub)
    _add_export_parser(sub)
    _add_data_parser(sub)
    _add_presets_parser(sub)
    _add_calibrate_parser(sub)
    _add_bench_parser(sub)
    from deepsim.applications.commands import add_subcommands

    add_subcommands(sub)  # invert, sample-preimages, sample-vae, eval
    from deepsim.caffe.command import add_subcommand as add_import_caffe

    add_import_caffe(sub)  # import-caffe
    return parser


def _add_reconstruct_parser(sub) -> None:
    """Add ``deepsim reconstruct`` to the subparsers ``sub``."""
    p = sub.add_parser("reconstruct", help="autoencode images with a trained checkpoint")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt (or its folder)")
    p.add_argument("--out", required=True, type=Path, help="folder for <name>_reconstruction.png files")
    p.add_argument(
        "--size", type=int, default=None, help="resize the shorter side to SIZE first (default: as is)"
    )
    p.add_argument("--device", default="auto")
    add_max_image_pixels_flag(p)
    _add_trust_flag(p)


def _add_data_parser(sub) -> None:
    """Add ``deepsim data check`` and ``deepsim data download`` to the subparsers ``sub``."""
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser(
        "check", help="scan a folder and report every image a training run would stumble on"
    )
    q.add_argument(
        "path", help="a folder of images, an STL-10 binary folder, or 'photos' (the bundled photos)"
    )
    q.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="smallest usable side (default: the --task's crop, else 64)",
    )
    q.add_argument(
        "--task",
        choices=TASK_NAMES,
        default=None,
        help="check for this task's preprocessing: its crop (autoencoder and vae: 64, invert: 227, after "
        "resizing the shorter side to 256: smaller images are resized up, reported as upscaled)",
    )
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    add_max_image_pixels_flag(q, MAX_IMAGE_PIXELS_HELP)
    q = data_sub.add_parser(
        "download",
        help="download a dataset (checksums verified); STL-10 lands in DIR/stl10_binary",
    )
    q.add_argument("dataset", choices=["stl10"], help="the dataset (stl10: torchvision's STL-10 release)")
    q.add_argument("dir", type=Path, metavar="DIR", help="folder to download into (created if needed)")
    q.add_argument("--url", default=None, help="a mirror of the same archive (default: torchvision's URL)")
    q.add_argument("--keep-archive", action="store_true", help="keep the .tar.gz beside the unpacked folder")
    q.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds to connect (default: %(default)s)"
    )
    q.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="seconds without a byte from the server before the attempt fails (default: %(default)s)",
    )
    q.add_argument(
        "--retries", type=int, default=3, help="attempts after a failed one (default: %(default)s)"
    )


def _add_presets_parser(sub) -> None:
    """Add ``deepsim presets`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "presets",
        help="list the presets, their values and where each comes from (paper, code or ours)",
        description="Without NAME: the default of every field that shapes an experiment with its source, "
        "then each preset's changes. With NAME: every field of that preset. Sources: paper = the paper, code "
        "= the derived Caffe code or the authors' prototxts, ours = our choice (README: 'Differences from "
        "the paper and the derived code').",
    )
    p.add_argument("name", nargs="?", help="one preset, in full")
    p.add_argument("--json", action="store_true", help="print {preset: {field: [value, source]}} as JSON")


def _add_trust_flag(parser) -> None:
    from deepsim.applications.commands import add_trust_flag

    add_trust_flag(parser)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained generator (or a whole checkpoint) as safetensors, a file that runs no code",
        description="Write the generator's weights of a checkpoint as safetensors, with its config and "
        "provenance (preset, step, commit) as JSON metadata. Every command that takes --checkpoint reads the "
        "file; in Python: deepsim.load_generator(PATH). Also takes the published PyTorch port of the "
        "authors' generators (upconvGAN state dicts, see docs/files.md).",
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="a run folder, checkpoint.pt, or an upconvGAN .pt"
    )
    p.add_argument("--out", required=True, type=Path, help="the file to write, e.g. G.safetensors")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--with-discriminator", action="store_true", help="also the discriminator's weights")
    what.add_argument(
        "--training-state",
        action="store_true",
        help="the whole training checkpoint (optimizers, RNG, data cursor): train --resume takes it",
    )
    p.add_argument(
        "--layer",
        choices=["pool5", "fc6", "fc7", "fc8"],
        help="upconvGAN files: the layer (default: from the keys)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_trust_flag(p)


def _cmd_export(args) -> int:
    from deepsim.export import export_checkpoint

    options = picked(args, "with_discriminator", "training_state", "layer", "force")
    result = export_checkpoint(args.checkpoint, args.out, **options)
    print(f"{args.checkpoint} -> {result.out}: {result.description}")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _overrides(args, task: str) -> dict:
    """The TrainConfig fields the command line sets; a flag of another task is an error naming its task."""
    overrides = {}
    for info in TRAIN_FIELDS:
        value = getattr(args, info.name)
        if value is None:
            continue
        if task not in info.tasks:
            raise ValueError(
                f"{_flag(info)} is a flag of 'deepsim train {' / '.join(info.tasks)}', not of {task} (the "
                f"task here); add the task: deepsim train {info.tasks[0]} {_flag(info)} ..."
            )
        if info.cli.get("action") == "on-off-auto":
            value = {"on": True, "off": False}.get(value, "auto")
        overrides[info.name] = value
    return overrides


def _train_config(args) -> tuple[TrainConfig, str, dict, str]:
    """(config, preset name, the fields the command line set, the offline note or "") of ``deepsim train``."""
    if args.task is None:
        args.task = get_preset(args.preset).task if args.preset else "autoencoder"
    preset = args.preset or default_preset(args.task, args.invert_layer)
    overrides = _overrides(args, args.task)
    config = get_preset(preset).replace(task=args.task, **overrides)
    offline = ""
    if args.random_weights:
        before = config
        config, offline = with_random_weights(config)
        changed = [k for k in ("comparator", "invert_network") if getattr(config, k) != getattr(before, k)]
        overrides.update({k: getattr(config, k) for k in changed})
    return config, preset, overrides, offline


def _announcer(offline: str):
    """The run's first lines on stderr: the path taken and why, then the run."""

    def announce(config, runtime: str) -> None:
        size, keep = checkpoint_bytes(config), config.keep_checkpoints
        disk = f"checkpoint about {_size(size)}, {_size(size * keep)} on disk with --keep-checkpoints {keep}"
        print(
            f"deepsim train {config.task}: {runtime}; {disk}" + (f"; {offline}" if offline else ""),
            file=sys.stderr,
        )
        print(
            f"deepsim train {config.task}: data={config.data} loss={config.loss} "
            f"comparator={config.comparator} "
            f"steps={config.steps} batch={config.batch_size} -> {config.out}",
            file=sys.stderr,
        )

    return announce


def _cmd_train(args) -> int:
    from deepsim.train.loop import train

    task_given = args.task is not None
    config, preset, overrides, offline = _train_config(args)
    fresh = not args.resume or (args.resume == "auto" and not any(Path(config.out).glob("checkpoint*.pt")))
    if fresh:  # a resumed run takes the checkpoint's config: the loop checks that one
        check_weights(config, downloads=args.download_weights)
    given = set(overrides) | ({"task"} if task_given else set()) | ({"preset"} if args.preset else set())
    result = train(
        config,
        resume=args.resume,
        progress=not args.no_progress,
        tasks=TASKS,
        resume_overrides=given,
        announce=_announcer(offline),
        provenance={"preset": preset},
    )
    return _train_finished(result, config)


def _train_finished(result, config: TrainConfig) -> int:
    """Report a finished (or signal-stopped) run on rank 0; the exit status."""
    from deepsim.train.preemption import PREEMPTED_EXIT_CODE

    if result.stopped_by:  # a stop signal: the checkpoint is written; run the same command to continue
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"stopped by {result.stopped_by} at step {result.step}: checkpoint {result.checkpoint}; "
                f"continue with the same command and --resume auto (exit status {PREEMPTED_EXIT_CODE})"
            )
        return PREEMPTED_EXIT_CODE
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports (and writes files)
        return 0
    last = result.history[-1] if result.history else {}
    summary = {k: round(v, 4) for k, v in last.items() if k.startswith("Loss/")}
    print(f"done: step {result.step}, checkpoint {result.checkpoint}, samples in {result.out / 'samples'}")
    if summary:
        print("last metrics: " + json.dumps(summary))
    after = TASK_TABLE[config.task].after
    if after is not None and result.checkpoint is not None:
        print(after(result.checkpoint, result.out, config))
    return 0


def _cmd_reconstruct(args) -> int:
    from deepsim.reconstruct import reconstruct_files

    options = picked(args, "size", "device", "max_image_pixels")
    for path, error in reconstruct_files(args.checkpoint, args.images, args.out, **options):
        print(f"{path}: squared error per pixel {error:.5f}")
    return 0


def _cmd_data_download(args) -> int:
    from deepsim.data.download import download_stl10

    options = picked(args, "url", "keep_archive", "connect_timeout", "read_timeout", "retries")
    folder = download_stl10(args.dir, **options)
    print(f"STL-10 in {folder} (checksums verified); train on it with --data {folder}")
    return 0


def _cmd_data_check(args) -> int:
    from deepsim.data.check import check_images, format_report

    min_size = args.min_size if args.min_size is not None else crop_size(args.task) if args.task else 64
    report = check_images(
        args.path if args.path == "photos" else Path(args.path),
        min_size=min_size,
        max_image_pixels=args.max_image_pixels,
        resize=resize_side(args.task) if args.task else None,
    )
    print(
        json.dumps(dataclasses.asdict(report), indent=2, default=str) if args.json else format_report(report)
    )
    return 1 if report.blocking else 0


def _add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="throughput benchmarks (kernels, loader, step); the same as python -m bench"
    )
    p.add_argument(
        "--groups", default="kernels,loader,step", help="comma-separated groups (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations (a few minutes on a CPU)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for results.json/.md (default: bench/out/<time>)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument(
        "--static",
        action="store_true",
        help="the conv kernels' static report instead (sm_90 compile on any machine: registers, spills, "
        "shared memory, wgmma/async loads, issued-MMA efficiency per layer)",
    )


def _cmd_bench(args) -> int:
    root = Path(__file__).resolve().parents[1]  # bench/ lives beside deepsim/ in a checkout, not in a wheel
    if not (root / "bench" / "__main__.py").exists():
        print(
            "deepsim bench: bench/ ships with the source checkout only; run it from a clone", file=sys.stderr
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.__main__ import main as bench_main

    argv = ["--groups", args.groups, "--device", args.device] + (["--quick"] if args.quick else [])
    argv += (["--out", str(args.out)] if args.out else []) + (
        ["--append-results"] if args.append_results else []
    )
    argv += ["--static"] if args.static else []
    return bench_main(argv)


def _cmd_presets(args) -> int:
    from deepsim.config import DEFAULT_SOURCES, PRESETS, TrainConfig, get_preset, value_sources

    names = [args.name] if args.name else list(PRESETS)
    if args.name:
        get_preset(args.name)  # an unknown name lists the valid ones
    table = {name: value_sources(name) for name in names}
    if args.json:
        print(
            json.dumps({n: {k: [v, s] for k, (v, s) in rows.items()} for n, rows in table.items()}, indent=2)
        )
        return 0
    if args.name:
        for field, (value, source) in table[args.name].items():
            print(f"{field:<24} {value!s:<28} {source}")
        return 0
    default = TrainConfig()
    print("defaults (every preset unless it changes the field):")
    for field, source in DEFAULT_SOURCES.items():
        print(f"  {field:<24} {getattr(default, field)!s:<28} {source}")
    for name, rows in table.items():
        print(f"{name}:")
        for field, (value, source) in rows.items():
            if value != getattr(default, field):
                print(f"  {field:<24} {value!s:<28} {source}")
    return 0


def _add_calibrate_parser(sub) -> None:
    from deepsim.calibrate import PERTURBATIONS, REFERENCE_LAMBDA_FEAT

    p = sub.add_parser(
        "calibrate",
        help="measure the lambda_feat that gives a comparator the reference comparator's term size",
        description="Feature distances between real images and perturbed versions of them (noise, blur, "
        "shift, downsampling: deepsim.calibrate), under the comparator and the reference; their ratio times "
        "the reference's lambda_feat is the comparator's calibrated lambda_feat.",
    )
    p.add_argument(
        "--comparator", default="alexnet:pool5", help="the comparator to calibrate (default: %(default)s)"
    )
    p.add_argument(
        "--comparator-weights", default=None, help="its weights file (default: torchvision's cache)"
    )
    p.add_argument(
        "--reference", default="caffenet:pool5", help="the comparator of known lambda_feat (%(default)s)"
    )
    p.add_argument(
        "--reference-weights", default=None, help="its weights file (CaffeNet: a state dict, see comparators)"
    )
    p.add_argument("--data", required=True, help="real images: a folder, 'photos' or an STL-10 binary folder")
    p.add_argument("--images", type=int, default=64, help="at most this many images (default: %(default)s)")
    p.add_argument(
        "--size", type=int, default=227, help="centre-crop side after resizing to 256 (default: 227)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--perturbations", default=",".join(PERTURBATIONS), help="comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--reference-lambda-feat",
        type=float,
        default=REFERENCE_LAMBDA_FEAT,
        help="the reference's lambda_feat in deepsim's scale convention (default: the code's 0.01 for "
        "CaffeNet = 0.005)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _cmd_calibrate(args) -> int:
    from deepsim.calibrate import calibrate_lambda_feat, format_report
    from deepsim.train.factory import resolve_device

    report = calibrate_lambda_feat(
        args.comparator,
        args.reference,
        **picked(args, "data", "comparator_weights", "reference_weights", "images", "size", "batch_size"),
        perturbations=[p.strip() for p in args.perturbations.split(",") if p.strip()],
        reference_lambda_feat=args.reference_lambda_feat,
        device=resolve_device(args.device),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"deepsim: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepsim`` command; returns the exit code. Known errors print one clear line."""
    from deepsim.data.interrupt import Interrupted
    from deepsim.errors import USER_ERRORS

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["train"] and {"-h", "--help"} & set(argv[1:]):
        text = _task_help(argv[1:])  # one task's flags; None: every flag (argparse's own help below)
        if text is not None:
            print(text, end="")
            raise SystemExit(0)
    args = build_parser().parse_args(argv)
    from deepsim.applications.commands import HANDLERS

    handler = {
        "train": _cmd_train,
        "reconstruct": _cmd_reconstruct,
        "presets": _cmd_presets,
        "calibrate": _cmd_calibrate,
        "export": _cmd_export,
        **HANDLERS,
    }.get(args.command)
    if args.command == "data":
        handler = _cmd_data_download if args.data_command == "download" else _cmd_data_check
    if args.command == "bench":
        handler = _cmd_bench
    if args.command == "import-caffe":
        from deepsim.caffe.command import run_import_caffe as handler
    from deepsim.comparators import allow_weight_downloads
    from deepsim.train.checkpoint import trust_checkpoints

    try:
        with allow_weight_downloads(getattr(args, "download_weights", False)), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            with trust_checkpoints(getattr(args, "trust_checkpoint", False)):
                return handler(args)
    except USER_ERRORS as error:
        text = (
            error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        )  # KeyError quotes it
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        print(f"deepsim {args.command}: error: {' '.join(lines) or type(error).__name__}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # a stop signal during a scan or a download: cleaned up, nothing half-written
        print(f"deepsim {args.command}: {stop}; nothing half-written was left", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"deepsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
