"""The `dismm` command line.

Subcommands are dispatched with `match`; heavy imports (torch, napari, Qt) happen inside
the branch that needs them, so `dismm --help` is instant. Errors the user can fix exit with
status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from napari_dismm import __version__
from napari_dismm.errors import DismmError

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser(*, plugin_commands: bool = True) -> argparse.ArgumentParser:
    """``plugin_commands=False`` leaves out the installed packages' subcommands (for `view`,
    whose start is timed against napari's: scanning entry points costs ~0.02 s)."""
    parser = _Parser(
        prog="dismm",
        description="Disentangled multi-modal learning of histology and transcriptomics: "
        "view slides, extract features, train and run DisMM models.",
    )
    parser.add_argument("--version", action="version", version=f"napari-dismm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    view = sub.add_parser("view", help="open a whole-slide image (and a prediction bundle) in napari")
    view.add_argument("slide", type=Path, help="slide file (.svs, .ndpi, .mrxs, .tif, ...)")
    view.add_argument("bundle", type=Path, nargs="?", help="prediction bundle directory from `dismm predict`")
    view.add_argument("--mpp", type=float, default=None, help="override microns per pixel at level 0")
    view.add_argument("--first-frame", action="store_true", help=argparse.SUPPRESS)

    demo = sub.add_parser("demo", help="the embedded default: the generated sample slide in napari")
    demo.add_argument("--headless", action="store_true", help="no window: write outputs to --out")
    demo.add_argument("--out", type=Path, default=None, help="output directory for --headless (default ./dismm-demo)")
    extract = sub.add_parser("extract", help="patch features at 10x and 20x for slides or folders of slides")
    extract.add_argument("inputs", type=Path, nargs="+", metavar="SLIDE_OR_DIR")
    extract.add_argument("--out", type=Path, required=True, help="output directory for feature files")
    extract.add_argument("--encoder", default="efficientnet-lite0", help="encoder name (default: efficientnet-lite0)")
    extract.add_argument("--weights", type=Path, default=None, help="local weight file for encoders that need one")
    extract.add_argument("--magnifications", nargs="+", default=["10", "20"], help="target magnifications (default: 10 20)")
    extract.add_argument("--scheduler", default=None, help="dask distributed scheduler address (default: this machine)")
    extract.add_argument("--mpp", type=float, default=None, help="override microns per pixel at level 0")
    extract.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a patch")
    extract.add_argument("--batch-size", type=int, default=None,
                         help="patches per batch (default: 64 on the CPU, sized to the free memory of a GPU)")
    extract.add_argument("--workers", type=int, default=2, help="reader threads per slide")
    extract.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    predict = sub.add_parser("predict", help="run a model on a slide (or its feature files) and write a prediction bundle")
    predict.add_argument("inputs", type=Path, nargs="+", metavar="SLIDE_OR_FEATURES",
                         help="a slide file, or one feature file (.h5) per magnification")
    predict.add_argument("--model", required=True, help="model directory, or `demo` for the shipped demo model")
    predict.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    predict.add_argument("--mpp", type=float, default=None, help="override microns per pixel at level 0")
    predict.add_argument("--features-dir", type=Path, default=None, help="feature cache (default: the user cache)")
    predict.add_argument("--weights", type=Path, default=None,
                         help="local weight file of the model's encoder (encoders other than the default)")
    predict.add_argument("--overlap", type=float, default=0.0,
                         help="finer maps: patch overlap fraction, stride = patch x (1 - overlap), e.g. 0.5")
    predict.add_argument("--bag", choices=["grid", "overlap"], default="grid",
                         help="with --overlap: the model's bag is the plain grid (default) or the overlapping one")

    if plugin_commands:
        _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Subcommands contributed by installed packages (the training backend registers
    `train`, `evaluate`, `synth` this way), so this package never imports them by name.

    Each entry point in the group `napari_dismm.commands` is a function taking the
    subparsers object; it adds its parser and sets `handler` (args -> exit code)."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="napari_dismm.commands"), key=lambda e: e.name):
        entry.load()(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(plugin_commands=argv[:1] != ["view"])
    args = parser.parse_args(argv)
    try:
        match args.command:
            case "view":
                return _view(args)
            case "demo":
                return _demo(args)
            case "extract":
                return _extract(args)
            case "predict":
                return _predict(args)
            case None:
                parser.print_help()
                return EXIT_OK
            case _:
                return args.handler(args)
    except DismmError as error:
        return _fail(error)
    except KeyboardInterrupt:
        print("dismm: interrupted", file=sys.stderr)
        return 130


def require_output_dir(path: Path, *, flag: str = "--out") -> Path:
    """An output directory argument: refuse an existing file (or a file on its way) up front."""
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            what = "names an existing file" if parent == path else f"is inside {parent}, which is a file"
            raise DismmError(f"{flag} {path} {what}; give a directory")
        if parent.exists():
            break
    return path


def _fail(error: Exception) -> int:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"dismm: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _view(args: argparse.Namespace) -> int:
    from napari_dismm.slide import open_slide

    # Validate headless first, so bad input fails before a window opens.
    slide = open_slide(args.slide, mpp=args.mpp)
    slide.keep_overview()  # decoded on a thread while napari starts
    if args.bundle is not None:
        from napari_dismm.bundle import check_bundle_matches_slide, read_bundle

        check_bundle_matches_slide(read_bundle(args.bundle), slide.info)
    from napari_dismm.viewer.app import prefer_dynamic_layer_controls, require_display, show_slide

    require_display()
    prefer_dynamic_layer_controls()
    show_slide(slide, bundle=args.bundle, exit_after_first_frame=args.first_frame)
    return EXIT_OK


def _extract(args: argparse.Namespace) -> int:
    from napari_dismm.features.cohort import extract_cohort

    require_output_dir(args.out)
    summary = extract_cohort(
        inputs=args.inputs, out_dir=args.out, encoder=args.encoder, weights=args.weights,
        scheduler=args.scheduler, progress=True,
        magnifications=args.magnifications, mpp=args.mpp, min_tissue=args.min_tissue,
        batch_size=args.batch_size, num_workers=args.workers, device=args.device,
    )
    print(summary.table())
    if not summary.ok:
        print(f"dismm: error: {len(summary.failed)} slide(s) failed; see the summary above", file=sys.stderr)
    return summary.exit_code


def _predict(args: argparse.Namespace) -> int:
    from napari_dismm.predict import features_by_magnification, predict_features, predict_slide

    progress = _StageReporter(bar_for="encode")
    try:
        if all(path.suffix.lower() in (".h5", ".hdf5") for path in args.inputs):
            if args.overlap:
                raise DismmError("--overlap needs the slide (its overlapping patches are encoded), not feature files")
            prediction = predict_features(
                features=features_by_magnification(args.inputs), model_dir=args.model, out_dir=args.out,
                device=args.device, progress=progress,
            )
        elif len(args.inputs) == 1 and args.overlap:  # finer maps (napari_dismm.fine_maps)
            from napari_dismm.fine_maps import predict_slide_fine

            prediction = predict_slide_fine(
                slide_path=args.inputs[0], model_dir=args.model, out_dir=args.out, device=args.device, mpp=args.mpp,
                features_dir=args.features_dir, progress=progress, overlap=args.overlap, bag=args.bag,
                encoder_weights=args.weights,
            )
        elif len(args.inputs) == 1:
            prediction = predict_slide(
                slide_path=args.inputs[0], model_dir=args.model, out_dir=args.out, device=args.device,
                mpp=args.mpp, features_dir=args.features_dir, progress=progress, encoder_weights=args.weights,
            )
        else:
            raise DismmError("give one slide, or feature files (.h5) only")
    finally:
        progress.close()
    if prediction.task == "classification":
        summary = f"{prediction.predicted_class} (p = {max(prediction.probabilities):.2f})"
    else:
        summary = f"risk {prediction.risk:.3f}"
    print(f"{prediction.slide_name}: {summary}; {len(prediction.patches)} patch rows; bundle in {args.out}")
    return EXIT_OK


class _StageReporter:
    """Progress on stderr: one line each time a stage starts, and for the stage ``bar_for``
    (the patch encoding of `dismm predict`, the long one) a bar with the elapsed time and an
    ETA. ``close()`` ends the bar, so an error line starts on a line of its own."""

    STEPS = 1000

    def __init__(self, bar_for: str | None = None) -> None:
        self.bar_for, self.bar, self.seen = bar_for, None, set()

    def __call__(self, stage: str, fraction: float) -> None:
        if stage == self.bar_for:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.STEPS, desc=f"dismm: {stage} patches", file=sys.stderr, dynamic_ncols=True,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            self.bar.update(max(0, round(fraction * self.STEPS) - self.bar.n))
            return
        self.close()
        if stage not in self.seen:
            self.seen.add(stage)
            print(f"dismm: {stage} ...", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: the generated sample slide (planted tumor, stroma and
    immune regions), the shipped demo student, its prediction shown as layers."""
    from napari_dismm.predict import predict_slide
    from napari_dismm.slide import open_slide
    from napari_dismm.slide.synthetic import sample_slide_path
    from napari_dismm.viewer.app import display_available, prefer_dynamic_layer_controls

    prefer_dynamic_layer_controls()
    started = time.perf_counter()
    print("dismm demo: preparing the generated sample slide ...", file=sys.stderr)
    slide_path = sample_slide_path()
    slide = open_slide(slide_path)
    headless = args.headless or not display_available()
    out = args.out or Path("dismm-demo")
    if headless and not args.headless:
        print(f"dismm demo: no display found; running headless, writing to {out}/", file=sys.stderr)
    prediction = predict_slide(
        slide_path=slide_path, model_dir="demo", out_dir=out / "bundle" if headless else None,
        progress=_StageReporter(),
    )
    print(f"dismm demo: the demo model predicts {prediction.predicted_class} "
          f"(p = {max(prediction.probabilities):.2f}) from {len(prediction.patches)} patch rows")
    if headless:
        from napari_dismm.viewer.app import headless_screenshot

        shot = headless_screenshot(slide, out_dir=out, prediction=prediction)
        print(f"dismm demo: wrote {out / 'bundle'} and {shot} in {time.perf_counter() - started:.1f} s")
        return EXIT_OK
    from napari_dismm.viewer.app import show_slide

    show_slide(slide, prediction=prediction)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
